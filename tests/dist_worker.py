"""Run under `mlx.launch -n N`: the drafting loop on a backbone sharded over the
ranks.  Reads a JSON job file, writes what rank 0 generated (and timings).

    mlx.launch -n 2 --backend ring python tests/dist_worker.py JOB.json OUT.json
"""

import json
import sys
import time

import mlx.core as mx

from mlx_mtpd import distributed
from mlx_mtpd.engine import SpecStats, mtp_generate_step
from mlx_mtpd.session import Session


def main(job_file, out_file):
    job = json.loads(open(job_file).read())
    cluster = distributed.init(timeout=job.get("timeout", 60))
    assert cluster is not None and cluster.size == job["ranks"], "not launched on the expected ranks"
    model, tok, heads = distributed.load(job["model"], job.get("heads"), None, cluster, job.get("sharding", "auto"))
    out = {"sharding": distributed.describe(model), "runs": [], "session": None}
    for run in job["runs"]:
        if run.get("seed") is not None:
            mx.random.seed(run["seed"])
        stats = SpecStats()
        tic = time.perf_counter()
        gen = mtp_generate_step(mx.array(run["prompt"]), model, heads if run["draft"] != "prompt-lookup" else None,
                                num_draft=run["num_draft"], draft=run["draft"], max_tokens=run["max_tokens"],
                                temp=run.get("temp", 0.0), stats=stats, cluster=cluster)
        toks = [t for t, _, _ in gen]
        out["runs"].append({"tokens": toks, "seconds": time.perf_counter() - tic, "forwards": stats.forwards,
                            "sources": stats.sources, "accepted": sum(stats.accepted),
                            "drafted": sum(stats.drafted)})
    if job.get("session"):
        # A session whose answers rank 0 stops early (as a stop string or a client
        # gone would): every rank must stay in step for the next answer.
        s = job["session"]
        sess = Session(model, tok, heads, num_draft=s["num_draft"], draft=s["draft"], cluster=cluster)
        if cluster.leader:
            got = []
            for ids, stop_after in zip(s["prompts"], s["stop_after"]):
                toks = []

                def enough(toks=toks, stop_after=stop_after):
                    return stop_after is not None and len(toks) >= stop_after

                for r in sess.stream(ids, max_tokens=s["max_tokens"], should_stop=enough):
                    toks.append(r.token)
                got.append(toks)
                if s.get("reset_between"):
                    sess.reset()
            sess.close()
            out["session"] = got
        else:
            sess.follow()
    out["syncs"] = cluster.sync_count
    out["sync_seconds"] = cluster.sync_time
    if cluster.leader:
        with open(out_file, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
