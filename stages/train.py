"""`train` stage: fit the cross-layer transcoder on the stored activations and export it
in circuit-tracer's format, with validation metrics and loss curves for DVC.

Resumable: killed mid-way, the next run continues from the last checkpoint.
`torchrun --standalone --nproc_per_node=N -m stages.train` (or `CLT_NPROC=N`) splits the
features over N processes (tensor parallel); the checkpoint resumes at any N.
"""

from pipeline.runtime import run_stage
from pipeline.train import run


def main() -> None:
    run_stage(run, distributed=True)


if __name__ == "__main__":
    main()
