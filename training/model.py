"""The model: the small CNN of the original recipe, behind one function a user can replace."""

from __future__ import annotations

import keras


def build(
    num_classes: int, input_shape=(64, 64, 1), data_format: str = "channels_last"
) -> keras.Model:
    """A small CNN for single-channel slices: three conv/pool blocks and a dense head.

    Args:
        num_classes: classes to tell apart; two gives one sigmoid unit (the probability of
            class 1), more give a softmax over the classes; 0 asks for a regression model:
            one linear unit.
        input_shape: one slice, ``(h, w, 1)`` or ``(1, h, w)`` for ``channels_first``.
            Defaults to ``(64, 64, 1)``.
        data_format: ``channels_last`` or ``channels_first``. Defaults to ``channels_last``.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: one class, or a negative number.

    Example:
        >>> build(2).output_shape, build(3).output_shape, build(0).layers[-1].activation.__name__
        ((None, 1), (None, 3), 'linear')
    """
    if num_classes == 1 or num_classes < 0:
        raise ValueError(
            "`num_classes` must be 0 (regression) or at least 2; "
            f"received num_classes={num_classes}"
        )
    layers = keras.layers
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", data_format=data_format)(x)
        x = layers.MaxPooling2D(2, data_format=data_format)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    if num_classes == 0:
        outputs = layers.Dense(1)(x)
    elif num_classes == 2:
        outputs = layers.Dense(1, activation="sigmoid")(x)
    else:
        outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="slice_cnn")


def augmentation(data_format: str = "channels_last", flip: bool = False) -> keras.Sequential:
    """Keras' own random layers for slices, active in training only.

    Small rotations (up to 18 degrees), shifts (5%), zoom (10%) and contrast (10%); a
    left-right flip only when asked, since the two sides of a brain differ.

    Example:
        >>> [type(layer).__name__ for layer in augmentation(flip=True).layers][-1]
        'RandomFlip'
    """
    layers = keras.layers
    steps = [
        layers.RandomRotation(0.05, fill_mode="constant", data_format=data_format),
        layers.RandomTranslation(0.05, 0.05, fill_mode="constant", data_format=data_format),
        layers.RandomZoom(0.1, fill_mode="constant", data_format=data_format),
        layers.RandomContrast(0.1, data_format=data_format),
    ]
    if flip:
        steps.append(layers.RandomFlip("horizontal", data_format=data_format))
    return keras.Sequential(steps, name="augmentation")
