"""The accuracy table of a quantization sweep: every run of a multirun directory against its unquantized run.

    trtllm-pipeline -m +experiment=smollm2_quant quantization=none,w8a16,...        # summarization
    trtllm-pipeline -m +experiment=smollm2_quant_ppl quantization=none,w8a16,...    # perplexity
    python benchmarks/quant_accuracy.py outputs/multirun/<date>/<time> [<more multirun dirs>]

Prints one Markdown row per run: the algorithm (and KV-cache algorithm), ROUGE-1/2/L and the ROUGE-1 change against
the unquantized engine, the share of summaries identical to the unquantized engine's, perplexity and its change.
Runs are matched by model and task; the unquantized run of the same directory set is the baseline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def runs(dirs: list[Path]) -> list[dict]:
    found = []
    for d in dirs:
        for record in sorted(d.glob("*/run.json")):
            run = json.loads(record.read_text())
            evaluate = run["metrics"].get("evaluate")
            if not evaluate:
                continue
            manifest = json.loads((Path(run["stages"]["convert"]["artifact"]) / "manifest.json").read_text())
            q = manifest["config"]["quantization"]
            outputs = Path(run["stages"]["evaluate"]["artifact"]) / "outputs.jsonl"
            texts = ({json.loads(line)["id"]: json.loads(line)["engine"] for line in outputs.read_text().splitlines()}
                     if outputs.is_file() else {})
            found.append({"algo": q.get("quant_algo") or "none", "kv": q.get("kv_cache_quant_algo") or "",
                          "metrics": evaluate, "texts": texts})
    return found


def fmt(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def main(argv: list[str]) -> None:
    found = runs([Path(a) for a in argv])
    summ = {(r["algo"], r["kv"]): r for r in found if "engine_rouge1" in r["metrics"]}
    ppl = {(r["algo"], r["kv"]): r for r in found if "engine_ppl" in r["metrics"]}
    base_s, base_p = summ.get(("none", "")), ppl.get(("none", ""))
    print("| quant_algo | kv cache | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-1 vs none | summaries identical to none | "
          "perplexity | perplexity vs none |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(summ) | set(ppl), key=lambda k: (k != ("none", ""), k)):
        s, p = summ.get(key), ppl.get(key)
        row = [key[0], key[1] or "-"]
        if s:
            m = s["metrics"]
            same = (sum(s["texts"].get(i) == t for i, t in base_s["texts"].items()) / len(base_s["texts"])
                    if base_s and base_s["texts"] else None)
            row += [fmt(m["engine_rouge1"]), fmt(m["engine_rouge2"]), fmt(m["engine_rougeL"]),
                    fmt(m["engine_rouge1"] - base_s["metrics"]["engine_rouge1"], 2) if base_s else "",
                    f"{same:.0%}" if same is not None else ""]
        else:
            row += [""] * 5
        if p:
            v = p["metrics"]["engine_ppl"]
            row += [fmt(v, 3), f"{(v / base_p['metrics']['engine_ppl'] - 1):+.1%}" if base_p else ""]
        else:
            row += ["", ""]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
