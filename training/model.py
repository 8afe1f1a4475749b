"""The model: the small CNN of the original recipe, behind one function a user can replace."""

from __future__ import annotations

import keras

# The first layer of a run's model fed the stored values (``--feed stored``, the default):
# ``Rescaling(scale, offset)`` from the store's values (uint8) to intensities.
FROM_STORED = "from_stored"


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


def taking_intensities(model: keras.Model) -> keras.Model:
    """A run's model as one that takes float32 intensities (``stored * scale + offset``),
    as ``H5Sequence`` gives them by default: a model fed the stored values (its
    :data:`FROM_STORED` layer) behind a ``Rescaling`` back to them; any other as it is."""
    if FROM_STORED not in [layer.name for layer in model.layers]:
        return model
    first = model.get_layer(FROM_STORED)
    inputs = keras.Input(model.input_shape[1:])
    stored = keras.layers.Rescaling(1 / first.scale, -first.offset / first.scale)(inputs)
    return keras.Model(inputs, model(stored), name=model.name)


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


def unet(
    num_classes: int, input_shape=(64, 64, 1), data_format: str = "channels_last"
) -> keras.Model:
    """A small U-Net for segmentation: three down and three up steps with skip connections.

    Args:
        num_classes: the labels, background included (at least 2): a softmax per pixel.
        input_shape: one slice, ``(h, w, channels)``; h and w divisible by 8.
        data_format: ``channels_last`` only (the masks are ``(h, w, 1)``).

    Returns:
        An uncompiled ``keras.Model`` with output ``(None, h, w, num_classes)``.

    Raises:
        ValueError: fewer than two labels, a side not divisible by 8, or channels first.

    Example:
        >>> unet(2, (32, 32, 3)).output_shape
        (None, 32, 32, 2)
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2; received num_classes={num_classes}")
    if data_format != "channels_last":
        raise ValueError("the U-Net reads channels last (--channels last)")
    if input_shape[0] % 8 or input_shape[1] % 8:
        raise ValueError(f"the U-Net needs sides divisible by 8; received {input_shape[:2]}")
    layers = keras.layers

    def block(x, filters):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization(momentum=0.9)(x)  # settles within an epoch
            x = layers.Activation("relu")(x)
        return x

    inputs = keras.Input(shape=input_shape)
    skips, x = [], inputs
    for filters in (16, 32, 64):
        x = block(x, filters)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = block(x, 128)
    for filters, skip in zip((64, 32, 16), reversed(skips), strict=True):
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = block(layers.Concatenate()([x, skip]), filters)
    outputs = layers.Conv2D(num_classes, 1, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="unet")
