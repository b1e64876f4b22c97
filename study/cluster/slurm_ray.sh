# Ray on a Slurm allocation, as Ray's own Slurm guide does it (a head node and worker nodes started
# with `ray start --block` inside `srun` steps), and the study run against it. Sourced by
# study/cluster/slurm.sbatch; each function also runs alone (the tests start a two-node Ray on
# loopback with them).
#
# Token authentication is on: every process needs RAY_AUTH_MODE=token and the same token file
# (~/.ray/auth_token, made by `ray get-auth-token --generate`; on the shared home of most
# clusters, or RAY_AUTH_TOKEN_PATH to a file every node reads). The dashboard and the tracking
# server listen on the head's loopback only: reach them with an SSH tunnel through the login node.

# ray_head IP PORT [RAY-START-OPTIONS...]: the head node (blocks until Ray stops).
ray_head() {
    local ip=$1 port=$2
    shift 2
    ray start --head --node-ip-address="$ip" --port="$port" --dashboard-host=127.0.0.1 \
        --disable-usage-stats "$@" --block
}

# ray_worker HEAD-ADDRESS IP [RAY-START-OPTIONS...]: a worker node joining the head (blocks).
ray_worker() {
    local head=$1 ip=$2
    shift 2
    ray start --address="$head" --node-ip-address="$ip" --disable-usage-stats "$@" --block
}

# wait_for_nodes HEAD-ADDRESS COUNT TIMEOUT-SECONDS: until COUNT nodes are alive (exit 1 after the timeout).
wait_for_nodes() {
    python - "$1" "$2" "$3" <<'PYTHON'
import sys, time
address, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
alive = 0
while time.monotonic() < deadline:
    try:
        import ray
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        alive = sum(node["Alive"] for node in ray.nodes())
        ray.shutdown()
        if alive >= count:
            print(f"Ray: {alive} node(s) up at {address}", flush=True)
            sys.exit(0)
    except Exception as exc:  # the head not up yet
        alive = f"head not reachable ({type(exc).__name__})"
    time.sleep(3)
print(f"error: Ray at {address}: {alive} of {count} node(s) after {timeout:.0f} s", file=sys.stderr)
sys.exit(1)
PYTHON
}

# run_study HEAD-ADDRESS STUDY-DIR [python -m study.run OPTIONS...]: the study on the cluster, its
# storage path STUDY-DIR/studies (a folder every node sees). Without STUDY_TRACKING_URI it first
# starts the tracking server on this node's loopback (runs in STUDY-DIR/mlflow-server, SQLite on the
# shared disk, or MLFLOW_BACKEND_STORE_URI / MLFLOW_ARTIFACTS_DESTINATION when set) and stops it after.
run_study() {
    local head=$1 dir=$2 port=${STUDY_TRACKING_PORT:-5000} server="" code=0
    shift 2
    local tracking=${STUDY_TRACKING_URI:-}
    mkdir -p "$dir"
    if [ -z "$tracking" ]; then
        tracking="http://127.0.0.1:$port"
        python -m study.tracking serve --root "$dir/mlflow-server" --port "$port" \
            >> "$dir/mlflow-server.log" 2>&1 &
        server=$!
        local tries=0
        until python -c "import requests, sys; requests.get(sys.argv[1] + '/health', timeout=2).raise_for_status()" \
                "$tracking" 2>/dev/null; do
            tries=$((tries + 1))
            if ! kill -0 "$server" 2>/dev/null || [ "$tries" -gt 120 ]; then
                echo "error: the tracking server did not start; see $dir/mlflow-server.log" >&2
                tail -n 5 "$dir/mlflow-server.log" >&2
                return 2
            fi
            sleep 1
        done
    fi
    python -m study.run --address "$head" --storage-path "$dir/studies" --tracking-uri "$tracking" "$@" || code=$?
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null
        wait "$server" 2>/dev/null
    fi
    return "$code"
}
