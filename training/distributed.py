"""Data-parallel training over several processes or hosts with Keras' own distribution API.

TensorFlow's ``MultiWorkerMirroredStrategy`` does not work with Keras 3
(keras-team/keras#20585); the multi-host path Keras 3 supports is ``keras.distribution`` on
the JAX backend: ``keras.distribution.initialize`` over ``jax.distributed``, and
``DataParallel`` with ``auto_shard_dataset=False``, each process feeding its own share of
every epoch through ``H5Sequence(..., shard=(index, count))``.
"""

from __future__ import annotations

import keras


class DistributedError(ValueError):
    """Distributed training cannot start; the message says why."""


def start(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Join the processes and make every model data-parallel over all their devices.

    Args:
        coordinator: ``HOST:PORT`` of process 0; None reads ``KERAS_DISTRIBUTION_*`` or
            what ``jax.distributed`` detects on the cluster (SLURM, ...).
        num_processes: how many processes; None as for ``coordinator``.
        process_id: this process's index; None as for ``coordinator``.

    Returns:
        ``(index, count)`` of this process.

    Raises:
        DistributedError: the backend is not JAX.
    """
    if keras.backend.backend() != "jax":
        raise DistributedError(
            f"--distributed needs the JAX backend: run with KERAS_BACKEND=jax (and pip install "
            f"'.[jax]'); received backend {keras.backend.backend()!r}"
        )
    import jax

    # CPU processes exchange gradients through gloo (GPUs and TPUs use their own links);
    # asking which backend runs would start it, which must wait for initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(coordinator, num_processes, process_id)
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    )
    return jax.process_index(), jax.process_count()


def local_copy(model: keras.Model) -> keras.Model:
    """The trained model as a plain one on this process's devices, for predicting alone.

    A data-parallel model's outputs span every process's devices; process 0 scores the
    validation and test splits by itself, after the others are done.
    """
    weights = model.get_weights()  # replicated on every process: whole here
    keras.distribution.set_distribution(None)
    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    return copy
