"""Compressed client-to-server communication: codecs that encode a host's (K, d) updates on the host
and decode them on the server (``comm=none|powersgd|sketch``; docs/communication.md).

A codec is built from the ``comm`` config group, the model's :class:`ParamSpec` and the run seed, the
same way on every host and on the server. Per round a host calls :meth:`Codec.encode` on its clients'
updates and sends the payload, one (K, p) tensor in the parameters' dtype (p << d), instead of the
(K, d) updates; the server calls :meth:`Codec.decode` on the stacked payload rows of the round, and the
aggregator, the adversary and the strategy see ordinary (n, d) updates. Error feedback (Seide et al.
2014; Karimireddy et al. 2019, "Error feedback fixes SignSGD") keeps a residual e_i per client on its
host: the client encodes x = u + e and keeps e <- x - decode(encode(x)).

* :class:`PowerSGD` (Vogels, Karimireddy, Jaggi, NeurIPS 2019): each matrix (conv kernels reshaped to
  (out, rest)) becomes P Q^T of rank r after one power-iteration step, P = orth(M Q), Q = M^T P, with
  Q warm-started from the client's previous round; vectors and tiny tensors are sent as they are.
* :class:`RandKSketch`: a seeded random-subsampling sketch: each round a seed derived from (run seed,
  round) picks the same k coordinates for every client; clients send those k values, no indices.
  The decoder scatters them back, scaled by n/k (unbiased over seeds) or unscaled (the contractive
  rand-k of Stich, Cordonnier, Jaggi, NeurIPS 2018, "Sparsified SGD with memory", for error feedback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flagstaff.clients.seeds import stream
from flagstaff.clients.trainer import ParamSpec

__all__ = ["Codec", "PowerSGD", "RandKSketch", "build_codec", "Layout"]

CODECS = ("none", "powersgd", "sketch")
DECODERS = ("auto", "unbiased", "contractive")


@dataclass(frozen=True)
class Layout:
    """Which parameter tensors are compressed: flat (start, stop) slices and (m, n) matrix shapes."""

    raw: tuple[tuple[int, int], ...]  # slices sent as they are (vectors, tiny tensors)
    packed: tuple[tuple[int, int, int, int], ...]  # (start, stop, m, n) of the compressed tensors

    @classmethod
    def of(cls, spec: ParamSpec, min_numel: int, rank: int | None = None) -> Layout:
        """Tensors with ndim >= 2 and numel >= ``min_numel`` are compressed; with ``rank``, only
        those where rank * (m + n) < m * n (a rank-r factorization that would not save bytes is
        sent as it is)."""
        raw, packed, i = [], [], 0
        for shape in spec.shapes:
            n_el = math.prod(shape)
            m, n = (shape[0], n_el // shape[0]) if len(shape) >= 2 else (n_el, 1)
            small = len(shape) < 2 or n_el < min_numel
            if small or (rank is not None and min(rank, m, n) * (m + n) >= m * n):
                raw.append((i, i + n_el))
            else:
                packed.append((i, i + n_el, m, n))
            i += n_el
        return cls(tuple(raw), tuple(packed))

    @property
    def raw_numel(self) -> int:
        return sum(b - a for a, b in self.raw)

    def raw_part(self, X: torch.Tensor) -> torch.Tensor:
        """(K, d) -> (K, raw_numel): the uncompressed tensors, concatenated."""
        if not self.raw:
            return X[:, :0]
        return torch.cat([X[:, a:b] for a, b in self.raw], dim=1)

    def packed_part(self, X: torch.Tensor) -> torch.Tensor:
        """(K, d) -> (K, n_c): the compressed tensors' coordinates, concatenated."""
        if not self.packed:
            return X[:, :0]
        return torch.cat([X[:, a:b] for a, b, _, _ in self.packed], dim=1)

    def scatter(self, out: torch.Tensor, raw: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Write the two concatenated parts back into ``out`` (K, d) at their places."""
        j = 0
        for a, b in self.raw:
            out[:, a:b] = raw[:, j : j + b - a]
            j += b - a
        j = 0
        for a, b, _, _ in self.packed:
            out[:, a:b] = packed[:, j : j + b - a]
            j += b - a
        return out


class Codec:
    """Base: encode (K, d) updates into a (K, p) payload with per-client state; decode (n, p)."""

    name = "codec"
    #: per-client state names kept on the hosts (and checkpointed), name -> row width
    state_widths: dict[str, int]

    def __init__(self, spec: ParamSpec, seed: int, error_feedback: bool) -> None:
        self.spec = spec
        self.d = spec.numel
        self.seed = int(seed)
        self.error_feedback = bool(error_feedback)
        self.state_widths = {"residual": self.d} if error_feedback else {}

    @property
    def payload_numel(self) -> int:
        """p: numbers each client sends per round."""
        raise NotImplementedError

    def init_state(self, rows: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Per-client state for ``rows`` clients that have not sent anything yet."""
        return {n: torch.zeros(rows, w, device=device) for n, w in self.state_widths.items()}

    def encode(
        self, U: torch.Tensor, state: dict[str, torch.Tensor], round_idx: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Updates (K, d) and the clients' state rows -> payload (K, p) and their new state rows.

        With error feedback the codec compresses x = u + e and the new residual is x - decode(...).
        A client whose x is not finite sends a NaN payload (the server drops and counts it) and
        keeps its state.
        """
        X = U + state["residual"] if self.error_feedback else U
        ok = torch.isfinite(X).all(dim=1)
        all_ok = bool(ok.all())
        if not all_ok:
            X = torch.where(ok[:, None], X, 0.0)
        payload, decoded, new = self._encode(X, state, round_idx)
        if self.error_feedback:
            new["residual"] = X - decoded
        if not all_ok:
            payload = torch.where(ok[:, None], payload, float("nan"))
            new = {n: torch.where(ok[:, None], v, state[n]) for n, v in new.items()}
        return payload, new

    def _encode(
        self, X: torch.Tensor, state: dict[str, torch.Tensor], round_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(payload (K, p), decoded (K, d), new state rows without the residual)."""
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, round_idx: int) -> torch.Tensor:
        """Payload rows (n, p) of round ``round_idx`` -> updates (n, d)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d={self.d}, p={self.payload_numel}, ef={self.error_feedback})"
        )


class PowerSGD(Codec):
    """Rank-r PowerSGD per tensor, one power iteration, warm-started Q per client (Vogels et al.,
    NeurIPS 2019, Algorithm 1 with the all-reduce replaced by sending P and Q to the server).

    For a matrix M (m, n) and the client's previous Q (n, r): P = orth(M Q) (reduced QR, batched
    over the host's K clients), Q' = M^T P; the client sends P and Q', the server decodes P Q'^T
    (= P P^T M, the projection of M onto span(P)), and the client keeps Q' for its next round.
    Exact when rank(M) <= r. Payload row: [raw tensors, then per matrix P (m*r), Q (n*r)].
    """

    name = "powersgd"

    def __init__(
        self,
        spec: ParamSpec,
        seed: int,
        rank: int = 2,
        error_feedback: bool = True,
        min_compress_numel: int = 256,
    ) -> None:
        super().__init__(spec, seed, error_feedback)
        self.rank = int(rank)
        self.layout = Layout.of(spec, min_compress_numel, rank=self.rank)
        self.ranks = tuple(min(self.rank, m, n) for _, _, m, n in self.layout.packed)
        self.q_width = sum(
            r * n for r, (_, _, _, n) in zip(self.ranks, self.layout.packed, strict=True)
        )
        if self.layout.packed:
            self.state_widths["q"] = self.q_width

    @property
    def payload_numel(self) -> int:
        fac = sum(
            r * (m + n) for r, (_, _, m, n) in zip(self.ranks, self.layout.packed, strict=True)
        )
        return self.layout.raw_numel + fac

    def init_state(self, rows: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Residuals at zero; every client's first Q is the same seeded standard normal draw."""
        state = super().init_state(rows, device)
        if self.layout.packed:
            g = torch.Generator().manual_seed(
                stream(self.seed, 0xC0DEC, kind="int", scheme="sequence63")
            )
            q0 = torch.randn(self.q_width, generator=g)
            state["q"] = q0.to(device).expand(rows, -1).clone()
        return state

    def _encode(
        self, X: torch.Tensor, state: dict[str, torch.Tensor], round_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        K = X.shape[0]
        parts, decoded, qs = [self.layout.raw_part(X)], X.clone(), []
        j = 0
        for r, (a, b, m, n) in zip(self.ranks, self.layout.packed, strict=True):
            M = X[:, a:b].reshape(K, m, n)
            Q = state["q"][:, j : j + n * r].reshape(K, n, r)
            j += n * r
            P, Q = powersgd_step(M, Q)
            parts += [P.reshape(K, -1), Q.reshape(K, -1)]
            qs.append(Q.reshape(K, -1))
            decoded[:, a:b] = (P @ Q.transpose(1, 2)).reshape(K, -1)
        new = {"q": torch.cat(qs, dim=1)} if qs else {}
        return torch.cat(parts, dim=1), decoded, new

    def decode(self, payload: torch.Tensor, round_idx: int) -> torch.Tensor:
        n_rows, j = payload.shape[0], self.layout.raw_numel
        out = payload.new_zeros(n_rows, self.d)
        k = 0
        for a, b in self.layout.raw:  # the raw tensors come first
            out[:, a:b] = payload[:, k : k + b - a]
            k += b - a
        for r, (a, b, m, n) in zip(self.ranks, self.layout.packed, strict=True):
            P = payload[:, j : j + m * r].reshape(n_rows, m, r)
            j += m * r
            Q = payload[:, j : j + n * r].reshape(n_rows, n, r)
            j += n * r
            out[:, a:b] = (P @ Q.transpose(1, 2)).reshape(n_rows, -1)
        return out


def powersgd_step(M: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One PowerSGD power-iteration step on a batch: M (K, m, n), Q (K, n, r) -> P (K, m, r) with
    orthonormal columns (reduced QR of M Q) and Q' = M^T P (K, n, r); M ~ P Q'^T (Vogels et al. 2019)."""
    P = torch.linalg.qr(M @ Q, mode="reduced").Q
    return P, M.transpose(1, 2) @ P


class RandKSketch(Codec):
    """Seeded random-subsampling sketch: round t sends the same k = ceil(ratio * n_c) of the n_c
    compressible coordinates for every client, chosen by a seed derived from (run seed, t), so no
    indices travel (the server derives them). Vectors and tiny tensors are sent as they are.

    Decoder: ``unbiased`` scatters the k values scaled by n_c / k (E over seeds of decode(encode(x))
    = x); ``contractive`` scatters them unscaled, ||x - C(x)||^2 = (1 - k/n_c) ||x||^2 in expectation,
    the compressor error feedback needs (Stich, Cordonnier, Jaggi, NeurIPS 2018); ``auto``: contractive
    with error feedback, unbiased without.
    """

    name = "sketch"

    def __init__(
        self,
        spec: ParamSpec,
        seed: int,
        ratio: float = 0.1,
        error_feedback: bool = True,
        min_compress_numel: int = 256,
        decoder: str = "auto",
    ) -> None:
        super().__init__(spec, seed, error_feedback)
        self.layout = Layout.of(spec, min_compress_numel)
        self.n_c = sum(b - a for a, b, _, _ in self.layout.packed)
        self.k = min(self.n_c, math.ceil(float(ratio) * self.n_c)) if self.n_c else 0
        if decoder == "auto":
            decoder = "contractive" if error_feedback else "unbiased"
        self.decoder = decoder
        self.scale = self.n_c / self.k if decoder == "unbiased" and self.k else 1.0
        self._cached: tuple[int, torch.Tensor] | None = None  # (round, indices)

    @property
    def payload_numel(self) -> int:
        return self.layout.raw_numel + self.k

    def indices(self, round_idx: int) -> torch.Tensor:
        """The k compressed-part coordinates of round ``round_idx`` (sorted; same on every host)."""
        if self._cached is None or self._cached[0] != round_idx:
            g = torch.Generator().manual_seed(
                stream(self.seed, round_idx, 0x5EE7C4, kind="int", scheme="sequence63")
            )
            idx = torch.randperm(self.n_c, generator=g)[: self.k].sort().values
            self._cached = (round_idx, idx)
        return self._cached[1]

    def _expand(self, values: torch.Tensor, round_idx: int) -> torch.Tensor:
        """(n, k) sent values -> (n, n_c) decoded compressed part."""
        full = values.new_zeros(values.shape[0], self.n_c)
        full[:, self.indices(round_idx).to(values.device)] = values * self.scale
        return full

    def _encode(
        self, X: torch.Tensor, state: dict[str, torch.Tensor], round_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        sent = self.layout.packed_part(X)[:, self.indices(round_idx).to(X.device)]
        raw = self.layout.raw_part(X)
        decoded = self.layout.scatter(X.clone(), raw, self._expand(sent, round_idx))
        return torch.cat([raw, sent], dim=1), decoded, {}

    def decode(self, payload: torch.Tensor, round_idx: int) -> torch.Tensor:
        j = self.layout.raw_numel
        out = payload.new_zeros(payload.shape[0], self.d)
        return self.layout.scatter(out, payload[:, :j], self._expand(payload[:, j:], round_idx))

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, k={self.k}/{self.n_c}, decoder={self.decoder})"


def build_codec(comm: dict[str, Any] | None, spec: ParamSpec, run_seed: int) -> Codec | None:
    """The codec of the ``comm`` config group (None for ``comm.kind=none``); ``comm.seed=null``
    derives the codec's seed from the run seed."""
    comm = comm or {}
    kind = str(comm.get("kind", "none"))
    if kind == "none":
        return None
    seed = run_seed if comm.get("seed") is None else int(comm["seed"])
    common = dict(
        error_feedback=bool(comm.get("error_feedback", True)),
        min_compress_numel=int(comm.get("min_compress_numel", 256)),
    )
    if kind == "powersgd":
        return PowerSGD(spec, seed, rank=int(comm.get("rank", 2)), **common)
    if kind == "sketch":
        return RandKSketch(
            spec,
            seed,
            ratio=float(comm.get("ratio", 0.1)),
            decoder=str(comm.get("decoder", "auto")),
            **common,
        )
    raise ValueError(f"comm.kind={kind!r}: choose one of {', '.join(CODECS)}")
