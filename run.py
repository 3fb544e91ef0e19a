"""torchrun entry point: torchtitan's trainer with the optical extension registered.

    torchrun --nproc_per_node=1 run.py --job.config_file train_configs/debug_model.toml

Any torchtitan option works on the command line (`--training.steps 50`, `--optical.transform_config
my.yaml`, `--parallelism.tensor_parallel_degree 2`, ...). Without a GPU it runs on the CPU (gloo).
"""

from torchtitan_ext.titan.launch import main

if __name__ == "__main__":
    main()
