"""``python -m pipeline.train`` (and ``accelerate launch`` / ``torchrun -m pipeline.train``): the
training job's stable entry point, as the launch scripts use it; the job is ``pipeline.jobs.train``."""
from pipeline.jobs.train import main

if __name__ == "__main__":
    main()
