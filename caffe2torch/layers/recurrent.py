"""RNN, LSTM and LSTMUnit with the numbers of Caffe's unrolled recurrent nets.

Caffe builds RNN/LSTM as an inner net unrolled over the T timesteps of the bottom
(recurrent_layer.cpp, rnn_layer.cpp, lstm_layer.cpp). These modules run the same
computation as one loop, with the same parameter blobs in the same order, the same
gate order (i, f, o, g) and the same handling of the sequence-continuation bottom
``cont`` (T, N): the previous hidden state is multiplied by ``cont_t`` before the
recurrent product and the LSTM forget gate is ``cont_t * sigmoid(.)``. ``cont`` never
gets a gradient.

Without ``expose_hidden`` the state carries over between forward calls, as in Caffe
(the inner net copies h_T/c_T into h_0/c_0 before each forward; it starts at zero and
restarts at zero when the batch size changes). With ``expose_hidden`` h_0 (and c_0)
are extra bottoms and h_T (and c_T) extra tops; like Caffe, only their data is used:
no gradient reaches h_0/c_0 and diffs written to h_T/c_T are ignored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import CaffeLayer, LayerSpec, Shape
from .registry import register


def _cell(gates: torch.Tensor, c_prev: torch.Tensor, cont: torch.Tensor):
    """One LSTMUnit forward (lstm_unit_layer.cpp): ``(c, h, acts, tanh(c))`` where ``acts``
    is ``(..., 4, H)`` holding i, f, o, g and ``f = 0`` where ``cont == 0``, else
    ``cont * sigmoid``."""
    z = gates.unflatten(-1, (4, -1))
    sig = torch.sigmoid(z[..., :3, :])
    g = torch.tanh(z[..., 3, :])
    keep = cont.unsqueeze(-1)
    f = torch.where(keep == 0, torch.zeros_like(keep), keep * sig[..., 1, :])
    acts = torch.stack((sig[..., 0, :], f, sig[..., 2, :], g), dim=-2)
    c = torch.addcmul(sig[..., 0, :] * g, f, c_prev)
    tanh_c = torch.tanh(c)
    return c, sig[..., 2, :] * tanh_c, acts, tanh_c


def _factors(acts: torch.Tensor, c_prev: torch.Tensor, tanh_c: torch.Tensor):
    """The per-element factors of LSTMUnit's Backward_cpu: ``a`` multiplies h's diff into
    c's, ``k`` (..., 4, H) turns (c_term, c_term, h_diff, c_term) into the gate diffs."""
    i, f, o, g = acts.unbind(-2)
    a = o * (1 - tanh_c * tanh_c)
    k = torch.stack((g * i * (1 - i), c_prev * f * (1 - f), tanh_c * o * (1 - o),
                     i * (1 - g * g)), dim=-2)
    return a, k


def _gate_diffs(c_diff: torch.Tensor, h_diff: torch.Tensor, a: torch.Tensor, k: torch.Tensor,
                f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's LSTMUnit backward from the factors: (gate diffs (..., 4H), c_prev diff).

    The forget gate's diff is ``c_term * c_prev * f * (1 - f)`` with ``f = cont * sigmoid``,
    the derivative only for binary ``cont``: Caffe's formula is kept as it is.
    """
    c_term = c_diff + h_diff * a
    gates = (torch.stack((c_term, c_term, h_diff, c_term), dim=-2) * k).flatten(-2)
    return gates, c_term * f


class _LSTMUnitFunction(torch.autograd.Function):
    """One LSTM step with Caffe's hand-written backward (no gradient to ``cont``)."""

    @staticmethod
    def forward(ctx, c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
        c, h, acts, tanh_c = _cell(gates, c_prev, cont)
        ctx.save_for_backward(c_prev, acts, tanh_c)
        return c, h

    @staticmethod
    def backward(ctx, c_diff: torch.Tensor, h_diff: torch.Tensor):
        c_prev, acts, tanh_c = ctx.saved_tensors
        a, k = _factors(acts, c_prev, tanh_c)
        gates_diff, c_prev_diff = _gate_diffs(c_diff, h_diff, a, k, acts[..., 1, :])
        return c_prev_diff, gates_diff, None


class _LSTMSequence(torch.autograd.Function):
    """Caffe's unrolled LSTM over T steps as one op, back-propagated through time by hand.

    ``inputs`` (T, N, 4H) are the input projections ``W_xc x_t + b_c [+ W_xc_static x_s]``;
    per step the gates add ``W_hc (cont_t h_{t-1})`` and one LSTMUnit runs. Backward is
    the unrolled net's: LSTMUnit's formulas, ``dh_{t-1} = cont_t (W_hc^T dgates_t)`` plus
    the output's diff, and one product for W_hc's diff. The initial state gets no
    gradient and the returned final state is not differentiable (as in Caffe).
    """

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, h: torch.Tensor,
                c: torch.Tensor, cont: torch.Tensor):
        w_t = weight.t()
        hs, c_prevs, acts, tanhs, conted = [], [], [], [], []
        for t in range(inputs.shape[0]):
            h_conted = h * cont[t].unsqueeze(-1)
            c_prevs.append(c)
            conted.append(h_conted)
            c, h, act, tanh_c = _cell(torch.addmm(inputs[t], h_conted, w_t), c, cont[t])
            hs.append(h)
            acts.append(act)
            tanhs.append(tanh_c)
        ctx.save_for_backward(weight, cont, torch.stack(c_prevs), torch.stack(acts),
                              torch.stack(tanhs), torch.stack(conted))
        ctx.mark_non_differentiable(h, c)
        return torch.stack(hs), h, c

    @staticmethod
    def backward(ctx, h_diffs: torch.Tensor, _h_final: torch.Tensor, _c_final: torch.Tensor):
        weight, cont, c_prevs, acts, tanhs, conted = ctx.saved_tensors
        a, k = _factors(acts, c_prevs, tanhs)
        forget = acts[..., 1, :]
        h_next = torch.zeros_like(h_diffs[0])
        c_next = torch.zeros_like(h_diffs[0])
        gate_diffs = []
        for t in range(h_diffs.shape[0] - 1, -1, -1):
            gates, c_next = _gate_diffs(c_next, h_diffs[t] + h_next, a[t], k[t], forget[t])
            h_next = torch.mm(gates, weight) * cont[t].unsqueeze(-1)
            gate_diffs.append(gates)
        gate_diffs = torch.stack(gate_diffs[::-1])
        weight_diff = None
        if ctx.needs_input_grad[1]:
            weight_diff = torch.mm(gate_diffs.flatten(0, 1).t(), conted.flatten(0, 1))
        return gate_diffs, weight_diff, None, None, None


def lstm_unit(c_prev: torch.Tensor, gates: torch.Tensor,
              cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, h)`` of one LSTM step; ``gates`` is ``(..., 4H)``, ``cont`` has ``c_prev``'s
    shape without its last axis."""
    return _LSTMUnitFunction.apply(c_prev, gates, cont.detach())


@register("LSTMUnit")
class LSTMUnit(CaffeLayer):
    """Bottoms ``c_prev (1, N, H)``, gate inputs ``(1, N, 4H)``, ``cont (1, N)``; tops c, h."""

    min_bottoms = max_bottoms = 3
    min_tops = max_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.infer_shapes(spec.bottom_shapes)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        c_prev, gates, cont = (tuple(s) for s in bottom_shapes)
        streams = c_prev[1] if len(c_prev) > 1 else None
        for name, shape, axes in (("c_prev", c_prev, 3), ("gates", gates, 3), ("cont", cont, 2)):
            if len(shape) != axes or shape[0] != 1 or shape[1] != streams:
                raise self.error(f"bottom {name} must have {axes} axes (1, N{', ...' * (axes > 2)})"
                                 f" with N = c_prev.shape[1], got {list(shape)} (c_prev "
                                 f"{list(c_prev)})")
        if gates[2] != 4 * c_prev[2]:
            raise self.error(f"gate input must have 4 * hidden ({4 * c_prev[2]}) channels, got "
                             f"shape {list(gates)} for c_prev {list(c_prev)}")
        return [c_prev, c_prev]

    def forward(self, c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
        return lstm_unit(c_prev, gates, cont)


class _Recurrent(CaffeLayer):
    """Shared shape rules, parameters and state of Caffe's RecurrentLayer."""

    min_bottoms = 2
    min_tops = 1
    num_states = 1          # recurrent blobs: RNN h; LSTM h and c
    gate_factor = 1         # rows of the input and recurrent weights per hidden unit

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.recurrent_param
        if p.num_output <= 0:
            raise self.error(f"recurrent_param.num_output must be positive, got {p.num_output}")
        self.hidden = int(p.num_output)
        self.expose_hidden = p.expose_hidden
        exposed = self.num_states if self.expose_hidden else 0
        extra = len(spec.param.bottom) - 2 - exposed
        if extra not in (0, 1):
            states = " and the initial state(s)" if exposed else ""
            raise self.error(f"expects bottoms x, cont, optionally x_static{states}: "
                             f"{2 + exposed} or {3 + exposed} bottom(s), got "
                             f"{len(spec.param.bottom)}")
        if len(spec.param.top) != 1 + exposed:
            raise self.error(f"expects {1 + exposed} top(s) (the output"
                             f"{' and the final state(s)' if exposed else ''}), got "
                             f"{len(spec.param.top)}")
        self.static_input = extra == 1
        shapes = spec.bottom_shapes
        if len(shapes[0]) < 2:
            raise self.error(f"bottom x must have at least 2 axes (#timesteps, #streams, ...), "
                             f"got {list(shapes[0])}")
        if self.static_input and len(shapes[2]) < 1:
            raise self.error("bottom x_static must have at least 1 axis (#streams, ...)")
        self.input_dim = math.prod(shapes[0][2:])
        self.static_dim = math.prod(shapes[2][1:]) if self.static_input else 0
        for i in range(self.num_states):
            self.register_buffer(f"state{i}", None, persistent=False)
        self.make_blobs(p.weight_filler, p.bias_filler)
        self.infer_shapes(shapes)

    def make_blobs(self, weight_filler, bias_filler) -> None:
        """Input weight and bias, static weight, recurrent weight: Caffe's first blobs."""
        rows = self.gate_factor * self.hidden
        self.add_blob((rows, self.input_dim), weight_filler)
        self.add_blob((rows,), bias_filler)
        if self.static_input:
            self.add_blob((rows, self.static_dim), weight_filler)
        self.add_blob((rows, self.hidden), weight_filler)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        x, cont = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(x) < 2 or math.prod(x[2:]) != self.input_dim:
            raise self.error(f"bottom x must be (T, N, ...) with {self.input_dim} values per "
                             f"step and stream, got {list(x)}")
        steps, streams = x[0], x[1]
        if cont != (steps, streams):
            raise self.error(f"bottom cont must be (T, N) = {[steps, streams]}, got {list(cont)}")
        offset = 2
        if self.static_input:
            static = tuple(bottom_shapes[2])
            if not static or static[0] != streams or math.prod(static[1:]) != self.static_dim:
                raise self.error(f"bottom x_static must be (N, ...) = ({streams}, ...) with "
                                 f"{self.static_dim} values per stream, got {list(static)}")
            offset = 3
        state = (1, streams, self.hidden)
        for shape in bottom_shapes[offset:]:
            if tuple(shape) != state:
                raise self.error(f"initial hidden state bottoms must be (1, N, num_output) = "
                                 f"{list(state)}, got {list(shape)}")
        exposed = self.num_states if self.expose_hidden else 0
        return [(steps, streams, self.hidden)] + [state] * exposed

    def _initial_states(self, bottoms: tuple[torch.Tensor, ...],
                        like: torch.Tensor) -> list[torch.Tensor]:
        streams = like.shape[1]
        if self.expose_hidden:
            given = bottoms[3 if self.static_input else 2:]
            return [b.detach().reshape(streams, self.hidden) for b in given]
        states = []
        for i in range(self.num_states):
            kept = getattr(self, f"state{i}")
            if kept is None or kept.shape != (streams, self.hidden) or kept.device != like.device:
                kept = like.new_zeros(streams, self.hidden)
            states.append(kept.to(like.dtype))
        return states

    def unroll(self, inputs: torch.Tensor, cont: torch.Tensor,
               states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Output (T, N, H) and final states from the per-step inputs ``(T, N, rows)``."""
        raise NotImplementedError

    def forward(self, *bottoms: torch.Tensor):
        x, cont = bottoms[0], bottoms[1].detach()
        steps, streams = x.shape[0], x.shape[1]
        w_in, b_in = self.blobs[0], self.blobs[1]
        inputs = F.linear(x.reshape(steps, streams, -1), w_in, b_in)
        if self.static_input:
            static = F.linear(bottoms[2].reshape(streams, -1), self.blobs[2])
            inputs = inputs + static.unsqueeze(0)
        out, finals = self.unroll(inputs, cont.to(x.dtype), self._initial_states(bottoms, x))
        finals = [s.detach() for s in finals]
        if not self.expose_hidden:
            for i, state in enumerate(finals):
                setattr(self, f"state{i}", state)
            return out
        return (out, *(s.reshape(1, streams, self.hidden) for s in finals))

    def recurrent_weight(self) -> torch.Tensor:
        return self.blobs[3 if self.static_input else 2]


@register("RNN")
class RNN(_Recurrent):
    """``h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static])``,
    output ``o_t = tanh(W_ho h_t + b_o)``. Blobs: W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o."""

    def make_blobs(self, weight_filler, bias_filler) -> None:
        super().make_blobs(weight_filler, bias_filler)
        self.add_blob((self.hidden, self.hidden), weight_filler)
        self.add_blob((self.hidden,), bias_filler)

    def unroll(self, inputs, cont, states):
        (h,) = states
        w_t = self.recurrent_weight().t()
        hs = []
        for t in range(inputs.shape[0]):
            h = torch.tanh(torch.addmm(inputs[t], h * cont[t].unsqueeze(1), w_t))
            hs.append(h)
        out = torch.tanh(F.linear(torch.stack(hs), self.blobs[-2], self.blobs[-1]))
        return out, [h]


@register("LSTM")
class LSTM(_Recurrent):
    """Gates ``W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static]`` in the
    order (i, f, o, g), then one LSTM unit step. Blobs: W_xc, b_c, [W_xc_static], W_hc;
    output h; states h and c."""

    num_states = 2
    gate_factor = 4

    def unroll(self, inputs, cont, states):
        h, c = states
        out, h, c = _LSTMSequence.apply(inputs, self.recurrent_weight(), h, c, cont)
        return out, [h, c]
