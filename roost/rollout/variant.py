"""Pinning a request to one side of a rollout (A/B routing by header): names and headers.

One place for what a client sends and what each backend reads: the local nginx proxy reads
``x-roost-variant: champion|challenger``; KServe/Knative read ``Knative-Serving-Tag`` with the
tags KServe gives the canary's traffic targets (``prev``: the champion, ``latest``: the
challenger). Each ignores the other's header, so a client that sends both (``roost predict
--variant``) pins the same side behind either backend. Kept free of heavy imports: the CLI
and the client import it.
"""

from __future__ import annotations

from enum import StrEnum


class Variant(StrEnum):
    CHAMPION = "champion"
    CHALLENGER = "challenger"


VARIANT_HEADER = "x-roost-variant"
KNATIVE_TAG_HEADER = "Knative-Serving-Tag"
# x-roost-variant -> the tag KServe gives that side's Knative traffic target.
KNATIVE_TAGS = {Variant.CHAMPION.value: "prev", Variant.CHALLENGER.value: "latest"}


def headers(variant: Variant | str | None) -> dict[str, str]:
    """The request headers that pin ``variant`` behind the local proxy and behind Knative."""
    if variant is None:
        return {}
    value = Variant(variant).value
    return {VARIANT_HEADER: value, KNATIVE_TAG_HEADER: KNATIVE_TAGS[value]}
