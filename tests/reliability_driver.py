"""Subprocess driver for tests/test_reliability_*.py: the real `sgsd` CLI with test-only patches.

    PYTHONPATH=REPO python tests/reliability_driver.py train -c tiny -o RUN model.name=TINY ...

Patches, each switched on by an environment variable (none are part of the package):

    SGSD_TEST_SCRIPTED_EXTRACTOR=1   skill extraction and merge calls answer with valid JSON whose
                                     text is a hash of the prompt (deterministic, so a resumed run can
                                     be compared with an uninterrupted one), so online bank updates
                                     really write a new bank (random tiny models never emit JSON)
    SGSD_TEST_RSS_LOG=PATH           after each metrics row, append {"step", "rss_kb", "fds"} to PATH
                                     (VmRSS from /proc/self/status, entries of /proc/self/fd)

Fault injection itself (SGSD_FAULT) lives in the package: see sgsd/faults.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from types import SimpleNamespace


class ScriptedExtractor:
    """Same shape as sgsd.generation generators; every answer holds one skill and one mistake."""

    def generate(self, conversations, params, enable_thinking=False):
        out = []
        for conv in conversations:
            prompt = conv if isinstance(conv, str) else conv[-1]["content"]
            tag = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            text = json.dumps(
                {
                    "general_skills": [
                        {"title": f"Rule {tag}", "principle": f"Check {tag}.", "when_to_apply": "Always."}
                    ],
                    "common_mistakes": [
                        {
                            "description": f"Slip {tag}.",
                            "why_it_happens": "Haste.",
                            "how_to_avoid": "Recompute.",
                        }
                    ],
                }
            )
            out.append([SimpleNamespace(text=text, token_ids=[], finish_reason="stop")])
        return out


def _vm_rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _patch() -> None:
    import sgsd.trainer
    from sgsd.trainer import Trainer

    if os.environ.get("SGSD_TEST_SCRIPTED_EXTRACTOR") == "1":  # the online update's extraction generator
        sgsd.trainer.extraction_generator = lambda cfg, policy_generator: ScriptedExtractor()
    rss_log = os.environ.get("SGSD_TEST_RSS_LOG")
    if rss_log:
        original_log = Trainer._log

        def log_with_memory(self, metrics):
            original_log(self, metrics)
            row = {"step": metrics["step"], "rss_kb": _vm_rss_kb(), "fds": len(os.listdir("/proc/self/fd"))}
            with open(rss_log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

        Trainer._log = log_with_memory


if __name__ == "__main__":
    _patch()
    from sgsd.cli import main

    sys.exit(main(sys.argv[1:]))
