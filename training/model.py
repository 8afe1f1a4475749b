"""The model: the small CNN of the original recipe, behind one function a user can replace."""

from __future__ import annotations

import keras


def build(
    num_classes: int, input_shape=(64, 64, 1), data_format: str = "channels_last"
) -> keras.Model:
    """A small CNN for single-channel slices: three conv/pool blocks and a dense head.

    Args:
        num_classes: classes to tell apart; two gives one sigmoid unit (the probability of
            class 1), more give a softmax over the classes.
        input_shape: one slice, ``(h, w, 1)`` or ``(1, h, w)`` for ``channels_first``.
            Defaults to ``(64, 64, 1)``.
        data_format: ``channels_last`` or ``channels_first``. Defaults to ``channels_last``.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: fewer than two classes.

    Example:
        >>> model = build(2)
        >>> model.output_shape
        (None, 1)
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2; received num_classes={num_classes}")
    layers = keras.layers
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", data_format=data_format)(x)
        x = layers.MaxPooling2D(2, data_format=data_format)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    if num_classes == 2:
        outputs = layers.Dense(1, activation="sigmoid")(x)
    else:
        outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="slice_cnn")
