"""One way to get a model: bundled reference models by ``edgeq/`` name, anything else by timm name."""
from __future__ import annotations

import difflib
import os
import socket
from functools import lru_cache

import timm
import torch

from edgeq.errors import CheckpointError, ModelNotFoundError, WeightsUnavailableError
from edgeq.models.checkpoint import load_into, read_state_dict
from edgeq.models.reference import REFERENCE_MODELS, ReferenceModel

__all__ = ["REFERENCE_MODELS", "ReferenceModel", "create_model", "is_known_model", "list_reference_models"]


def list_reference_models() -> list[ReferenceModel]:
    return list(REFERENCE_MODELS.values())


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def is_known_model(name: str) -> bool:
    return name in REFERENCE_MODELS or timm.is_model(name.split(".", 1)[0])


def _unknown(name: str) -> ModelNotFoundError:
    candidates = list(REFERENCE_MODELS) + list(_timm_names())
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `edgeq models`"
    return ModelNotFoundError(f"unknown model {name!r}{hint}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when pretrained weights can come from the hub, or when the user forces online/offline mode."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return True  # the hub client then reads its local cache, and says clearly when a file is missing
    from urllib.parse import urlparse

    import huggingface_hub.constants

    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


#: the seed of every random initialisation :func:`create_model` makes
RANDOM_INIT_SEED = 0


def create_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
) -> torch.nn.Module:
    """A model in eval mode.

    Weights come from ``checkpoint`` when given; otherwise a reference model
    loads its bundled weights, and a timm model its pretrained weights when
    ``pretrained`` (which needs the network) or stays randomly initialised.
    Random initialisation is seeded (:data:`RANDOM_INIT_SEED`, the caller's
    torch RNG untouched): two builds of one random model are the same model,
    so their latencies compare and a tuning database made for one fits the other.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _create_model(name, checkpoint, pretrained, num_classes)


def _create_model(name: str, checkpoint, pretrained: bool, num_classes: int | None) -> torch.nn.Module:
    if name in REFERENCE_MODELS:
        ref = REFERENCE_MODELS[name]
        model = ref.build()
        if checkpoint is not None:
            load_into(model, read_state_dict(checkpoint), str(checkpoint))
        elif pretrained:
            if not ref.weights_path.exists():
                raise WeightsUnavailableError(f"bundled weights for {name} are missing ({ref.weights_path})")
            load_into(model, read_state_dict(ref.weights_path), str(ref.weights_path))
        return model.eval()

    if not timm.is_model(name.split(".", 1)[0]):
        raise _unknown(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_into(model, read_state_dict(checkpoint), str(checkpoint))
        return model.eval()
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    if not _hub_reachable():
        # Without this check the hub client retries for about a minute before failing.
        raise WeightsUnavailableError(
            f"pretrained weights for {name} need the network (model hub unreachable and nothing cached); "
            "pass --checkpoint FILE, or --random-init for random weights"
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs).eval()
    except CheckpointError:
        raise
    except Exception as exc:  # timm/hub raise many kinds (network, missing file, no pretrained tag)
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailableError(
            f"pretrained weights for {name} could not be loaded ({reason}); "
            "pass --checkpoint FILE, or --random-init for random weights"
        ) from None
