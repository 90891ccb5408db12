"""Rebuild the bundled lm-eval task data from ../data/alpaca_en_demo.json (deterministic):

    python assets/eval/make_tasks.py

alpaca_mc.jsonl   100 multiple-choice questions: the question is a record's instruction (and input), the
                  choices its own output and the outputs of 3 other records (outputs of at most 300
                  characters; records and distractors picked by a numpy generator seeded 0; the gold answer
                  at position i % 4).
alpaca_ppl.jsonl  the held-out records (the last 10%, as the configs' split 'train[90%:]'), one document each:
                  instruction, a blank line, output.
"""
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "data", "alpaca_en_demo.json")


def main():
    with open(SOURCE, encoding="utf-8") as f:
        records = json.load(f)
    rng = np.random.default_rng(0)
    short = [i for i, r in enumerate(records) if len(r["output"]) <= 300]
    picked = rng.permutation(short)[:100]
    with open(os.path.join(HERE, "alpaca_mc.jsonl"), "w", encoding="utf-8") as f:
        for n, i in enumerate(picked):
            r = records[int(i)]
            others = [int(j) for j in rng.permutation(short) if int(j) != int(i)
                      and records[int(j)]["output"] != r["output"]][:3]
            choices = [records[j]["output"] for j in others]
            choices.insert(n % 4, r["output"])
            question = r["instruction"] + (("\n" + r["input"]) if r["input"] else "")
            f.write(json.dumps({"id": int(i), "question": question, "choices": choices, "label": n % 4},
                               ensure_ascii=False) + "\n")
    start = len(records) * 90 // 100
    with open(os.path.join(HERE, "alpaca_ppl.jsonl"), "w", encoding="utf-8") as f:
        for i in range(start, len(records)):
            r = records[i]
            f.write(json.dumps({"id": i, "text": r["instruction"] + "\n\n" + r["output"]}, ensure_ascii=False)
                    + "\n")


if __name__ == "__main__":
    main()
