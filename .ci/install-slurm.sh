#!/usr/bin/env bash
# A real single-node Slurm for tests/slurm_local.py (auth/none, so no munge needed): Debian's slurm-wlm.
exec bash "$(dirname "$0")/apt-install.sh" "slurmctld slurmd sbatch" slurm-wlm
