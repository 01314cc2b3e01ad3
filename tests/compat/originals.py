"""Plain PyTorch oracles of the original search code, written here from the same equations: quark0/darts
(``cnn/model_search.py``, ``operations.py``, ``architect.py``) and khanrc/pt.darts (``models/``,
``architect.py``), with the originals' module layout, so their parameter names are the originals'.

Every candidate runs as its plain modules (no fastdarts kernel), the mixed op is ``sum(w * op(x))`` over all
candidates, and the architects copy the model for the unrolled step and perturb the weights in place, as the
originals do.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# ---- shared candidate pieces -------------------------------------------------------------------------------


def relu_conv_bn(C_in, C_out, k, stride, padding, affine):
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(C_in, C_out, k, stride, padding, bias=False),
        nn.BatchNorm2d(C_out, affine=affine),
    )


def dil_layers(C_in, C_out, k, stride, padding, dilation, affine):
    return [
        nn.ReLU(),
        nn.Conv2d(C_in, C_in, k, stride, padding, dilation=dilation, groups=C_in, bias=False),
        nn.Conv2d(C_in, C_out, 1, bias=False),
        nn.BatchNorm2d(C_out, affine=affine),
    ]


class Seq(nn.Module):
    """One nn.Sequential held under the attribute name the original uses (`op` in DARTS, `net` in pt.darts)."""

    def __init__(self, attr, *layers):
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.Sequential(*layers))

    def forward(self, x):
        return getattr(self, self.attr)(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride] * 0.0


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine, names=("conv_1", "conv_2")):
        super().__init__()
        self.names = names
        self.relu = nn.ReLU()
        setattr(self, names[0], nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False))
        setattr(self, names[1], nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False))
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        c1, c2 = (getattr(self, n) for n in self.names)
        return self.bn(torch.cat([c1(x), c2(x[:, :, 1:, 1:])], dim=1))


def _mix(ops, x, weights):
    return sum(w * op(x) for w, op in zip(weights, ops))


# ---- quark0/darts --------------------------------------------------------------------------------------------

DARTS_PRIMITIVES = [
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
    "dil_conv_5x5",
]  # fmt: skip


def darts_op(name, C, stride, affine):
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C, affine)
    k = int(name[-1])
    if name.startswith("sep"):
        p = k // 2
        return Seq("op", *dil_layers(C, C, k, stride, p, 1, affine), *dil_layers(C, C, k, 1, p, 1, affine))
    return Seq("op", *dil_layers(C, C, k, stride, k - 1, 2, affine))


class DartsMixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList()
        for name in DARTS_PRIMITIVES:
            op = darts_op(name, C, stride, False)
            self._ops.append(nn.Sequential(op, nn.BatchNorm2d(C, affine=False)) if "pool" in name else op)

    def forward(self, x, weights):
        return _mix(self._ops, x, weights)


MixedOp = DartsMixedOp  # looked up when a cell is built, so a test can patch it as users patch model_search


class DartsCell(nn.Module):
    edge = None  # the mixed op class; None: this module's MixedOp at construction time

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        edge = self.edge or MixedOp
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, False)
        else:
            self.preprocess0 = Seq("op", *relu_conv_bn(C_prev_prev, C, 1, 1, 0, False))
        self.preprocess1 = Seq("op", *relu_conv_bn(C_prev, C, 1, 1, 0, False))
        self._steps, self._multiplier = steps, multiplier
        self._ops = nn.ModuleList(
            edge(C, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            states.append(sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[-self._multiplier :], dim=1)


class DartsNetwork(nn.Module):
    cell = DartsCell
    imagenet = False  # PC-DARTS' model_search_imagenet.py: stem0 (two stride-2 convs) and stem1 (one more)

    def __init__(self, C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__()
        self._criterion, self._steps, self._multiplier = criterion, steps, multiplier
        C_curr = stem_multiplier * C
        if self.imagenet:
            self.stem0 = nn.Sequential(
                nn.Conv2d(3, C_curr // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_curr // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C_curr // 2, C_curr, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_curr),
            )  # fmt: skip
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=True), nn.Conv2d(C_curr, C_curr, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )  # fmt: skip
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = self.imagenet
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(
                self.cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            )
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        k = sum(2 + i for i in range(steps))
        self.alphas_normal = (1e-3 * torch.randn(k, len(DARTS_PRIMITIVES))).requires_grad_()
        self.alphas_reduce = (1e-3 * torch.randn(k, len(DARTS_PRIMITIVES))).requires_grad_()

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce]

    def stems(self, x):
        if self.imagenet:
            s0 = self.stem0(x)
            return s0, self.stem1(s0)
        s = self.stem(x)
        return s, s

    def forward(self, x):
        s0, s1 = self.stems(x)
        for cell in self.cells:
            s0, s1 = (
                s1,
                cell(s0, s1, F.softmax(self.alphas_reduce if cell.reduction else self.alphas_normal, -1)),
            )
        return self.classifier(self.global_pooling(s1).flatten(1))

    def _loss(self, x, y):
        return self._criterion(self(x), y)

    def parse(self, W):
        """DARTS' rule on one cell's op weights W (a list of rows): per node, the two edges with the largest
        non-`none` weight, each with that op."""
        none = DARTS_PRIMITIVES.index("none")
        gene, start = [], 0
        for i in range(self._steps):
            rows = W[start : start + 2 + i]
            edges = sorted(range(2 + i), key=lambda j: -max(w for k, w in enumerate(rows[j]) if k != none))[
                :2
            ]
            for j in edges:
                best = max((k for k in range(len(rows[j])) if k != none), key=lambda k: (rows[j][k], -k))
                gene.append((DARTS_PRIMITIVES[best], j))
            start += 2 + i
        return gene

    def genotype(self):
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)
        n, r = (F.softmax(a, -1).tolist() for a in self.arch_parameters()[:2])
        return (self.parse(n), concat, self.parse(r), concat)


def darts_arch_grads(model, x_train, y_train, x_val, y_val, eta, optimizer, unrolled, momentum, weight_decay):
    """The alpha gradient of quark0's Architect: first order, or through a copied unrolled model with the
    finite-difference Hessian-vector product taken by perturbing the weights in place."""
    alphas = model.arch_parameters()
    if not unrolled:
        return torch.autograd.grad(model._loss(x_val, y_val), alphas)
    weights = list(model.parameters())
    g = torch.autograd.grad(model._loss(x_train, y_train), weights)
    unrolled_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, up, gi in zip(weights, unrolled_model.parameters(), g):
            buf = optimizer.state[p].get("momentum_buffer")
            moment = momentum * buf if buf is not None else 0.0
            up.copy_(p - eta * (moment + gi + weight_decay * p))
    u_alphas = unrolled_model.arch_parameters()
    grads = torch.autograd.grad(
        unrolled_model._loss(x_val, y_val), u_alphas + list(unrolled_model.parameters())
    )
    d_alpha, v = grads[: len(alphas)], grads[len(alphas) :]
    hvp = fd_hvp_in_place(model, weights, v, model._loss, x_train, y_train)
    return [d - eta * h for d, h in zip(d_alpha, hvp)]


# ---- yuhuixu1993/PC-DARTS ------------------------------------------------------------------------------------


def channel_shuffle(x, groups):
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).contiguous().view(B, C, H, W)


class PcMixedOp(nn.Module):
    k = 4  # model_search_imagenet.py: 2

    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList()
        self.mp = nn.MaxPool2d(2, 2)
        for name in DARTS_PRIMITIVES:
            op = darts_op(name, C // self.k, stride, False)
            self._ops.append(
                nn.Sequential(op, nn.BatchNorm2d(C // self.k, affine=False)) if "pool" in name else op
            )

    def forward(self, x, weights):
        c = x.shape[1] // self.k
        mixed = _mix(self._ops, x[:, :c], weights)
        rest = x[:, c:] if mixed.shape[2] == x.shape[2] else self.mp(x[:, c:])
        return channel_shuffle(torch.cat([mixed, rest], dim=1), self.k)


class PcCell(DartsCell):
    edge = PcMixedOp

    def forward(self, s0, s1, weights, weights2):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            states.append(
                sum(
                    weights2[offset + j] * self._ops[offset + j](h, weights[offset + j])
                    for j, h in enumerate(states)
                )
            )
            offset += len(states) - 1
        return torch.cat(states[-self._multiplier :], dim=1)


class PcNetwork(DartsNetwork):
    cell = PcCell

    def __init__(self, C, num_classes, layers, criterion):
        super().__init__(C, num_classes, layers, criterion)
        k = self.alphas_normal.shape[0]
        self.betas_normal = (1e-3 * torch.randn(k)).requires_grad_()
        self.betas_reduce = (1e-3 * torch.randn(k)).requires_grad_()

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce]

    def _weights2(self, betas):
        parts, start = [], 0
        for i in range(self._steps):
            parts.append(F.softmax(betas[start : start + 2 + i], dim=-1))
            start += 2 + i
        return torch.cat(parts)

    def forward(self, x):
        s0, s1 = self.stems(x)
        for cell in self.cells:
            alphas, betas = (
                (self.alphas_reduce, self.betas_reduce)
                if cell.reduction
                else (self.alphas_normal, self.betas_normal)
            )
            s0, s1 = s1, cell(s0, s1, F.softmax(alphas, -1), self._weights2(betas))
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self):
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)
        n, r = (
            (F.softmax(a, -1) * self._weights2(b)[:, None]).tolist()
            for a, b in ((self.alphas_normal, self.betas_normal), (self.alphas_reduce, self.betas_reduce))
        )
        return (self.parse(n), concat, self.parse(r), concat)


class PcImagenetMixedOp(PcMixedOp):
    k = 2


class PcImagenetCell(PcCell):
    edge = PcImagenetMixedOp

    def forward(self, s0, s1, weights, weights2):
        # model_search_imagenet.py calls each edge twice: once for weights2[...].to(<its output>.device)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            node = 0
            for j, h in enumerate(states):
                self._ops[offset + j](h, weights[offset + j])
                node = node + weights2[offset + j] * self._ops[offset + j](h, weights[offset + j])
            states.append(node)
            offset += len(states) - 1
        return torch.cat(states[-self._multiplier :], dim=1)


class PcImagenetNetwork(PcNetwork):
    cell = PcImagenetCell
    imagenet = True


def fd_hvp_in_place(model, weights, v, loss_fn, x, y, buggy=False):
    """(grad_alpha L(w + R v) - grad_alpha L(w - R v)) / (2 R), R = 0.01 / ||v||, weights moved in place.
    buggy: pt.darts' ``(p - n) / 2. * eps``."""
    R = 0.01 / torch.cat([t.flatten() for t in v]).norm()
    alphas = model.arch_parameters()
    with torch.no_grad():
        for p, t in zip(weights, v):
            p.add_(R * t)
    g_pos = torch.autograd.grad(loss_fn(x, y), alphas)
    with torch.no_grad():
        for p, t in zip(weights, v):
            p.sub_(2 * R * t)
    g_neg = torch.autograd.grad(loss_fn(x, y), alphas)
    with torch.no_grad():
        for p, t in zip(weights, v):
            p.add_(R * t)
    return [(a - b) / 2.0 * R if buggy else (a - b) / (2 * R) for a, b in zip(g_pos, g_neg)]


# ---- khanrc/pt.darts -----------------------------------------------------------------------------------------

PT_PRIMITIVES = DARTS_PRIMITIVES[1:] + ["none"]


class PoolBN(nn.Module):
    def __init__(self, pool_type, C, stride):
        super().__init__()
        if pool_type == "max":
            self.pool = nn.MaxPool2d(3, stride, 1)
        else:
            self.pool = nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        self.bn = nn.BatchNorm2d(C, affine=False)

    def forward(self, x):
        return self.bn(self.pool(x))


def pt_op(name, C, stride):
    if name == "none":
        return Zero(stride)
    if "pool" in name:
        return PoolBN(name[:3], C, stride)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C, False, ("conv1", "conv2"))
    k = int(name[-1])
    if name.startswith("sep"):
        p = k // 2
        return Seq(
            "net",
            Seq("net", *dil_layers(C, C, k, stride, p, 1, False)),
            Seq("net", *dil_layers(C, C, k, 1, p, 1, False)),
        )
    return Seq("net", *dil_layers(C, C, k, stride, k - 1, 2, False))


class PtMixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList(pt_op(name, C, stride) for name in PT_PRIMITIVES)

    def forward(self, x, weights):
        return _mix(self._ops, x, weights)


class PtSearchCell(nn.Module):
    def __init__(self, n_nodes, C_pp, C_p, C, reduction_p, reduction):
        super().__init__()
        self.reduction = reduction
        if reduction_p:
            self.preproc0 = FactorizedReduce(C_pp, C, False, ("conv1", "conv2"))
        else:
            self.preproc0 = Seq("net", *relu_conv_bn(C_pp, C, 1, 1, 0, False))
        self.preproc1 = Seq("net", *relu_conv_bn(C_p, C, 1, 1, 0, False))
        self.dag = nn.ModuleList(
            nn.ModuleList(PtMixedOp(C, 2 if reduction and j < 2 else 1) for j in range(2 + i))
            for i in range(n_nodes)
        )

    def forward(self, s0, s1, w_dag):
        states = [self.preproc0(s0), self.preproc1(s1)]
        for edges, w_list in zip(self.dag, w_dag):
            states.append(sum(edges[j](s, w) for j, (s, w) in enumerate(zip(states, w_list))))
        return torch.cat(states[2:], dim=1)


class PtSearchCNN(nn.Module):
    def __init__(self, C_in, C, n_classes, n_layers, n_nodes=4, stem_multiplier=3):
        super().__init__()
        C_cur = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(C_in, C_cur, 3, 1, 1, bias=False), nn.BatchNorm2d(C_cur))
        C_pp, C_p, C_cur = C_cur, C_cur, C
        self.cells = nn.ModuleList()
        reduction_p = False
        for i in range(n_layers):
            reduction = i in (n_layers // 3, 2 * n_layers // 3)
            C_cur = C_cur * 2 if reduction else C_cur
            self.cells.append(PtSearchCell(n_nodes, C_pp, C_p, C_cur, reduction_p, reduction))
            reduction_p = reduction
            C_pp, C_p = C_p, C_cur * n_nodes
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(C_p, n_classes)

    def forward(self, x, weights_normal, weights_reduce):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights_reduce if cell.reduction else weights_normal)
        return self.linear(self.gap(s1).flatten(1))


class PtController(nn.Module):
    def __init__(self, C_in, C, n_classes, n_layers, criterion, n_nodes=4, stem_multiplier=3):
        super().__init__()
        self.criterion = criterion
        self.alpha_normal = nn.ParameterList()
        self.alpha_reduce = nn.ParameterList()
        for i in range(n_nodes):
            self.alpha_normal.append(nn.Parameter(1e-3 * torch.randn(i + 2, len(PT_PRIMITIVES))))
            self.alpha_reduce.append(nn.Parameter(1e-3 * torch.randn(i + 2, len(PT_PRIMITIVES))))
        self.net = PtSearchCNN(C_in, C, n_classes, n_layers, n_nodes, stem_multiplier)

    def forward(self, x):
        return self.net(
            x, [F.softmax(a, -1) for a in self.alpha_normal], [F.softmax(a, -1) for a in self.alpha_reduce]
        )

    def loss(self, x, y):
        return self.criterion(self(x), y)

    def arch_parameters(self):
        return list(self.alpha_normal) + list(self.alpha_reduce)


def pt_arch_grads(net, trn_X, trn_y, val_X, val_y, xi, w_optim, w_momentum, w_weight_decay, buggy=False):
    """pt.darts' unrolled_backward: a deep-copied virtual network at w', then the in-place finite difference."""
    weights = list(net.net.parameters())
    v_net = copy.deepcopy(net)
    g = torch.autograd.grad(net.loss(trn_X, trn_y), weights)
    with torch.no_grad():
        for w, vw, gi in zip(weights, v_net.net.parameters(), g):
            m = w_optim.state[w].get("momentum_buffer", 0.0) * w_momentum
            vw.copy_(w - xi * (m + gi + w_weight_decay * w))
    v_alphas = v_net.arch_parameters()
    grads = torch.autograd.grad(v_net.loss(val_X, val_y), v_alphas + list(v_net.net.parameters()))
    d_alpha, dw = grads[: len(v_alphas)], grads[len(v_alphas) :]
    hessian = fd_hvp_in_place(net, weights, dw, net.loss, trn_X, trn_y, buggy)
    return [d - xi * h for d, h in zip(d_alpha, hessian)]
