"""Rollout workers on a two-node Ray cluster, on one machine (ray.cluster_utils.Cluster: a head and a second node
of 1 CPU each, each its own raylet): GRPO on a tiny random Llama with `ray: {address: <the cluster>,
rollout_workers: 2, placement: STRICT_SPREAD}` joins the cluster the way `--ray.address auto` joins one made by
`ray start`, puts one worker on each node, and must give the one-process run's rollouts and final weights.
Prints the node of each bundle and RESULT ok|FAILED. Needs ray (the [ray] extra). About a minute on 2 cores.

    python benchmarks/ray_cluster_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def write_run(root: Path) -> dict:
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.data.synthetic import VOCABULARY, prompt_records
    from alignkit.models.tiny import build_tiny_model, build_word_tokenizer

    tokenizer = build_word_tokenizer(VOCABULARY)
    build_tiny_model("llama", len(tokenizer), seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl_atomic(root / "prompts.jsonl", prompt_records(64, seed=31))
    return dict(method="grpo", model=str(root / "model"), prompts=str(root / "prompts.jsonl"), reward="synthetic",
                rounds=3, prompts_per_round=8, num_samples=4, max_new_tokens=10, max_length=64, learning_rate=1e-3,
                max_tokens_per_batch=1024, eval_samples=1, progress=False, sampling={"batch_size": 4})


def main() -> int:
    from ray.cluster_utils import Cluster

    from alignkit.online import online_config, ray_rollouts, run_online

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="alignkit-ray-cluster-"))
    common = write_run(root)
    run_online(online_config({**common, "output_dir": str(root / "one")}))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    placed, real_engine = [], ray_rollouts.RolloutCluster.engine

    def engine(self, *args):
        from ray.util import placement_group_table

        placed.append(placement_group_table(self.group)["bundles_to_node_id"])
        return real_engine(self, *args)

    ray_rollouts.RolloutCluster.engine = engine
    try:
        ray_options = {"address": cluster.address, "rollout_workers": 2, "placement": "STRICT_SPREAD"}
        run_online(online_config({**common, "output_dir": str(root / "ray"), "ray": ray_options}))
    finally:
        cluster.shutdown()
    nodes = placed[0]
    print("bundle -> node:", json.dumps({str(k): v[:12] for k, v in nodes.items()}))
    lines = [(root / name / "rollouts.jsonl").read_text() for name in ("one", "ray")]
    final, expected = (load_file(root / name / "final" / "model.safetensors") for name in ("ray", "one"))
    gap = max(float((final[k] - expected[k]).abs().max()) for k in expected)
    ok = len(set(nodes.values())) == 2 and lines[0] == lines[1] and gap <= 1e-5
    print(f"rollouts equal: {lines[0] == lines[1]}; largest weight difference {gap:.2e}")
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
