"""`python -m bench model|pipeline ...`: the same commands as `lavi-label bench`, without the rest of the CLI
(the GPU machine has torch and transformers but not ray, decord or av)."""
from jobs.bench import bench

if __name__ == "__main__":
    bench(prog_name="python -m bench")
