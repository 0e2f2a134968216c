"""The words both sides of a graph use: the resource's API names, its topologies and stages, and which topology
runs which stages. No I/O, no dependencies."""

from __future__ import annotations

from enum import StrEnum

GROUP = "mmgraph.io"
VERSION = "v1alpha1"
KIND = "MultimodalGraph"
PLURAL = "multimodalgraphs"
SHORT_NAME = "mmg"
API_VERSION = f"{GROUP}/{VERSION}"


class Topology(StrEnum):
    """How the model is split into stages."""

    AGG = "agg"
    E_PD = "e-pd"
    E_P_D = "e-p-d"


class StageName(StrEnum):
    FRONTEND = "frontend"
    ENCODER = "encoder"
    PD = "pd"
    DECODE = "decode"


STAGES_OF: dict[Topology, tuple[StageName, ...]] = {
    Topology.AGG: (StageName.FRONTEND, StageName.PD),
    Topology.E_PD: (StageName.FRONTEND, StageName.ENCODER, StageName.PD),
    Topology.E_P_D: (StageName.FRONTEND, StageName.ENCODER, StageName.PD, StageName.DECODE),
}
