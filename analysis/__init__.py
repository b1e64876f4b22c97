"""Analysis: survival metrics (`analysis.metrics`) and the study report."""
