"""`evaluate` stage: splice the trained transcoder into the model in place of its MLPs and
measure, on held-out sequences, how much of the model's next-token behaviour it keeps
(CE loss, CE-loss recovered, KL, top-1 agreement; all layers and one at a time).
"""

from pipeline.evaluate import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
