"""`pack` stage: the examples in circuit-tracer's packed feature format (`index.json.gz` plus
one `layer_{l}.bin` per layer, docs/formats.md, "Packed features"), for the attribution-graph frontend.
"""

from pipeline.featpack import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
