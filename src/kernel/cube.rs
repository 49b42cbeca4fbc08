//! The fused CubeCL kernel (wgpu, CUDA): one cube per row, f32 accumulation.
//!
//! Per row, the threads of a cube stride over the vocabulary: one online-softmax pass gives the
//! maxima and the sums of the tempered exponentials (and of the temperature-1 ones, and the
//! finite-column count for label smoothing) and, for forward KL, the divergence in closed form;
//! the other divergences take a second pass for the divergence and `Σ q·∂D/∂q`; a last pass, if
//! asked, writes the gradient of the reduced loss. Forward KL thus reads each row twice with the
//! gradient (once without) and writes the gradient once. Reductions across the cube go through shared memory (a tree), which every
//! device has; no plane (subgroup) operations are required. `−inf` logits (vocabulary padding)
//! contribute nothing; no `−inf` literal is needed (WGSL has none): the running maxima start at
//! `−3.0e38`.

use burn::tensor::{
    DType, Int, Shape, Tensor as BurnTensor, TensorPrimitive, ops::FloatTensor, ops::IntTensor,
};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
    ops::numeric::empty_device_dtype, tensor::CubeTensor,
};
use cubecl::prelude::*;

use crate::{DistillBackend, DistillParams, DistillParts, Divergence, FusedOutput, Reduction};

/// Threads per cube (one cube per row).
const BLOCK: u32 = 256;

/// Sum of `value` over the cube (shared-memory tree; every unit gets the result).
#[cube]
fn block_sum(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    smem[unit] = value;
    sync_cube();
    // A runtime value (CUBE_DIM_X = block): a loop counter must not be a comptime constant.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            smem[unit] = smem[unit] + smem[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = smem[0];
    sync_cube();
    total
}

/// Maximum of `value` over the cube.
#[cube]
fn block_max(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    smem[unit] = value;
    sync_cube();
    // A runtime value (CUBE_DIM_X = block): a loop counter must not be a comptime constant.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            let other = smem[unit + stride];
            if other > smem[unit] {
                smem[unit] = other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = smem[0];
    sync_cube();
    total
}

/// The divergence term of column `j`; `kind` and `mix` encode the divergence (see
/// `divergence_code`).
#[cube]
fn column_term(q: f32, p: f32, lq: f32, lp: f32, kind: u32, mix: f32) -> f32 {
    let mut d = f32::new(0.0);
    if kind == 0 {
        // forward KL
        if p > 0.0 {
            d = p * (lp - lq);
        }
    } else if kind == 1 {
        // reverse KL
        if q > 0.0 {
            d = q * (lq - lp);
        }
    } else if kind == 2 {
        // JSD(β), mix = β
        let m = mix * p + (1.0 - mix) * q;
        if m > 0.0 {
            let lm = m.ln();
            if p > 0.0 {
                d = mix * p * (lp - lm);
            }
            if q > 0.0 {
                d += (1.0 - mix) * q * (lq - lm);
            }
        }
    } else if kind == 3 {
        // skew KL, mix = λ: KL(p ‖ λp + (1−λ)q)
        let m = mix * p + (1.0 - mix) * q;
        if p > 0.0 {
            d = p * (lp - m.ln());
        }
    } else if kind == 4 {
        // skew reverse KL, mix = λ: KL(q ‖ (1−λ)p + λq)
        if q > 0.0 {
            let m = (1.0 - mix) * p + mix * q;
            d = q * (lq - m.ln());
        }
    } else {
        // TVD
        let diff = q - p;
        if diff > 0.0 {
            d = diff * 0.5;
        } else {
            d = -diff * 0.5;
        }
    }
    d
}

/// `g_j = ∂D/∂q_j` of column `j` for JSD, skew KL, skew reverse KL and TVD (forward and
/// reverse KL have closed forms in the gradient pass).
#[cube]
fn column_grad(q: f32, p: f32, lq: f32, _lp: f32, kind: u32, mix: f32) -> f32 {
    let mut g = f32::new(0.0);
    if kind == 2 {
        let m = mix * p + (1.0 - mix) * q;
        if q > 0.0 {
            g = (1.0 - mix) * (lq - m.ln());
        }
    } else if kind == 3 {
        let m = mix * p + (1.0 - mix) * q;
        if m > 0.0 {
            g = -((1.0 - mix) * p / m);
        }
    } else if kind == 4 {
        if q > 0.0 {
            let m = (1.0 - mix) * p + mix * q;
            g = lq - m.ln() + 1.0 - mix * q / m;
        }
    } else if kind == 5 {
        let diff = q - p;
        if diff > 0.0 {
            g = 0.5;
        } else if diff < 0.0 {
            g = -0.5;
        }
    }
    g
}

/// One cube per row: row loss, soft and hard terms, and optionally the gradient.
// `x - x` and `0 / 0` below build 0 and NaN from runtime values (WGSL has no NaN literal).
#[allow(clippy::eq_op)]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn distill_kernel<F: Float, I: Numeric>(
    student: &Tensor<F>,
    teacher: &Tensor<F>,
    targets: &Tensor<I>,
    scale: &Tensor<F>,
    loss: &mut Tensor<F>,
    soft: &mut Tensor<F>,
    hard: &mut Tensor<F>,
    grad: &mut Tensor<F>,
    inv_t: f32,
    t2: f32,
    alpha: f32,
    eps: f32,
    mix: f32,
    kind: u32,
    ignore: i32,
    flags: u32,
    #[comptime] block: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    // flags: bit 0 targets present, bit 1 ignore index set, bit 2 write the gradient.
    let row = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let step = block as usize;
    let v = student.shape(1);
    let ss = student.stride(0);
    let ts = teacher.stride(0);
    let gs = grad.stride(0);
    let sc = student.stride(1);
    let tc = teacher.stride(1);
    let gc = grad.stride(1);
    let with_targets = (flags & 1) == 1;
    let with_grad = (flags & 4) == 4;
    let mut smem = SharedMemory::<f32>::new(block as usize);

    // Without labels `targets` is a dummy `[N]` tensor of zeros.
    let class = i32::cast_from(targets[row * targets.stride(0)]);
    let skip = with_targets && (flags & 2) == 2 && class == ignore;
    let bad = with_targets && !skip && (class < 0 || class >= v as i32);
    if skip || bad {
        if unit == 0 {
            // NaN from runtime values for out-of-range targets (WGSL has no NaN literal).
            let zero = inv_t - inv_t;
            let mut value = zero;
            if bad {
                value = zero / zero;
            }
            loss[row] = F::cast_from(value);
            soft[row] = F::cast_from(value);
            hard[row] = F::cast_from(value);
        }
        if with_grad {
            let mut j = unit;
            while j < v {
                grad[row * gs + j * gc] = F::cast_from(0.0f32);
                j += step;
            }
        }
        terminate!();
    }

    // Pass 1 (online softmax): running maxima and sums of exponentials, rescaled when a
    // maximum grows; for forward KL also `w = Σ e^{(t−mt)/T}·(t − s)`, from which the
    // divergence follows without another pass over the row.
    let fkl = kind == 0;
    let mut ms = f32::new(-3.0e38);
    let mut mt = f32::new(-3.0e38);
    let mut sum_s = f32::new(0.0);
    let mut sum_1 = f32::new(0.0);
    let mut sum_t = f32::new(0.0);
    let mut w = f32::new(0.0);
    let mut finite = f32::new(0.0);
    let mut total = f32::new(0.0);
    let mut j = unit;
    while j < v {
        let s = f32::cast_from(student[row * ss + j * sc]);
        let t = f32::cast_from(teacher[row * ts + j * tc]);
        if s > ms {
            sum_s *= ((ms - s) * inv_t).exp();
            sum_1 *= (ms - s).exp();
            ms = s;
        }
        sum_s += ((s - ms) * inv_t).exp();
        sum_1 += (s - ms).exp();
        if t > mt {
            let r = ((mt - t) * inv_t).exp();
            sum_t *= r;
            w *= r;
            mt = t;
        }
        let et = ((t - mt) * inv_t).exp();
        sum_t += et;
        if fkl && et > 0.0 {
            w += et * (t - s);
        }
        if s > -3.0e38f32 {
            finite += 1.0;
            total += s;
        }
        j += step;
    }
    // Across the cube: the row maxima, then each unit's sums rescaled to them.
    let row_ms = block_max(&mut smem, ms);
    let row_mt = block_max(&mut smem, mt);
    let rt = ((mt - row_mt) * inv_t).exp();
    let sum_s = block_sum(&mut smem, sum_s * ((ms - row_ms) * inv_t).exp());
    let sum_1 = block_sum(&mut smem, sum_1 * (ms - row_ms).exp());
    let sum_t = block_sum(&mut smem, sum_t * rt);
    let finite = block_sum(&mut smem, finite);
    let total = block_sum(&mut smem, total) - finite * row_ms;
    let ms = row_ms;
    let mt = row_mt;
    let lse_s = sum_s.ln();
    let lse_t = sum_t.ln();
    let lse_1 = sum_1.ln();

    // The divergence and Σ q g: closed form for forward KL (Σ p = 1),
    // KL = E_p[t − s]/T − (mt − ms)/T − lse_t + lse_s; a second pass for the others.
    let mut div = f32::new(0.0);
    let mut sqg = f32::new(0.0);
    if fkl {
        let w = block_sum(&mut smem, w * rt);
        div = w / sum_t * inv_t - (mt - ms) * inv_t - lse_t + lse_s;
    } else {
        let mut j = unit;
        while j < v {
            let s = f32::cast_from(student[row * ss + j * sc]);
            let t = f32::cast_from(teacher[row * ts + j * tc]);
            let lq = (s - ms) * inv_t - lse_s;
            let lp = (t - mt) * inv_t - lse_t;
            let q = lq.exp();
            let p = lp.exp();
            div += column_term(q, p, lq, lp, kind, mix);
            sqg += q * column_grad(q, p, lq, lp, kind, mix);
            j += step;
        }
        div = block_sum(&mut smem, div);
        sqg = block_sum(&mut smem, sqg);
    }

    let soft_value = t2 * div;
    let mut hard_value = f32::new(0.0);
    let mut a = alpha;
    let mut b = 1.0 - alpha;
    if with_targets {
        let s_y = f32::cast_from(student[row * ss + class as usize * sc]);
        let nll = lse_1 - (s_y - ms);
        hard_value = (1.0 - eps) * nll - eps * (total / finite - lse_1);
    } else {
        a = 1.0;
        b = 0.0;
    }
    let mut row_loss = a * soft_value + b * hard_value;
    if a == 1.0 {
        row_loss = soft_value;
    } else if a == 0.0 {
        row_loss = hard_value;
    }
    if unit == 0 {
        loss[row] = F::cast_from(row_loss);
        soft[row] = F::cast_from(soft_value);
        hard[row] = F::cast_from(hard_value);
    }

    // Pass 4: the gradient of the reduced loss.
    if with_grad {
        let factor = f32::cast_from(scale[0]);
        let ca = a * t2 * inv_t * factor;
        let cb = b * factor;
        let eps_f = eps / finite;
        let mut j = unit;
        while j < v {
            let s = f32::cast_from(student[row * ss + j * sc]);
            let t = f32::cast_from(teacher[row * ts + j * tc]);
            let lq = (s - ms) * inv_t - lse_s;
            let lp = (t - mt) * inv_t - lse_t;
            let q = lq.exp();
            let p = lp.exp();
            let mut soft_grad = q - p;
            if kind == 1 {
                soft_grad = 0.0;
                if q > 0.0 {
                    soft_grad = q * (lq - lp - div);
                }
            } else if kind > 1 {
                soft_grad = q * (column_grad(q, p, lq, lp, kind, mix) - sqg);
            }
            let mut value = ca * soft_grad;
            if cb != 0.0 {
                let mut h = (s - ms - lse_1).exp();
                if s > -3.0e38f32 {
                    h -= eps_f;
                }
                if j == class as usize {
                    h -= 1.0 - eps;
                }
                value += cb * h;
            }
            grad[row * gs + j * gc] = F::cast_from(value);
            j += step;
        }
    }
}

/// `(kind, mix)` of a divergence, as the kernel encodes it.
fn divergence_code(d: Divergence) -> (u32, f32) {
    match d {
        Divergence::ForwardKl => (0, 0.0),
        Divergence::ReverseKl => (1, 0.0),
        Divergence::Jsd { beta } => (2, beta as f32),
        Divergence::SkewKl { lambda } => (3, lambda as f32),
        Divergence::SkewReverseKl { lambda } => (4, lambda as f32),
        Divergence::Tvd => (5, 0.0),
    }
}

/// Row outputs of the kernel: `[N]` loss, soft, hard, and `[N, V]` gradient if asked.
pub(crate) struct CubeRows<R: CubeRuntime> {
    pub loss: CubeTensor<R>,
    pub soft: CubeTensor<R>,
    pub hard: CubeTensor<R>,
    pub grad: Option<CubeTensor<R>>,
}

/// Launches the kernel. `targets` must hold `[N]` class indices (or be `None`); `scale` is the
/// `[1]` factor of the reduction that the gradient is multiplied by.
pub(crate) fn launch<R: CubeRuntime>(
    student: CubeTensor<R>,
    teacher: CubeTensor<R>,
    targets: Option<CubeTensor<R>>,
    scale: CubeTensor<R>,
    params: &DistillParams,
    with_grad: bool,
) -> CubeRows<R> {
    let student = into_contiguous(student);
    let teacher = into_contiguous(teacher);
    let [n, v] = student.meta.shape().dims::<2>();
    let client = student.client.clone();
    let device = student.device.clone();
    let dtype = student.dtype;
    let rows = || empty_device_dtype::<R>(client.clone(), device.clone(), Shape::new([n]), dtype);
    let (loss, soft, hard) = (rows(), rows(), rows());
    let grad = if with_grad {
        empty_device_dtype::<R>(client.clone(), device.clone(), Shape::new([n, v]), dtype)
    } else {
        empty_device_dtype::<R>(client.clone(), device.clone(), Shape::new([1, 1]), dtype)
    };
    let has_targets = targets.is_some();
    // Without labels the kernel reads (and ignores) a dummy `[N]` tensor of zeros.
    let targets = match targets {
        Some(t) => into_contiguous(t),
        None => burn_cubecl::ops::numeric::zeros_client::<R>(
            client.clone(),
            device.clone(),
            Shape::new([n]),
            DType::I32,
        ),
    };
    let (kind, mix) = divergence_code(params.divergence);
    let t2 = if params.scale_by_t2 {
        params.temperature * params.temperature
    } else {
        1.0
    };
    let ignore = params
        .ignore_index
        .unwrap_or(0)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    let flags = has_targets as u32
        | ((params.ignore_index.is_some() as u32) << 1)
        | ((with_grad as u32) << 2);
    let i_dtype = targets.dtype;
    distill_kernel::launch::<R>(
        &client,
        CubeCount::Static(n as u32, 1, 1),
        CubeDim::new_1d(BLOCK),
        student.into_tensor_arg(),
        teacher.into_tensor_arg(),
        targets.into_tensor_arg(),
        scale.into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        soft.clone().into_tensor_arg(),
        hard.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        (1.0 / params.temperature) as f32,
        t2 as f32,
        params.alpha as f32,
        params.label_smoothing as f32,
        mix,
        kind,
        ignore,
        flags,
        BLOCK,
        [dtype.into(), i_dtype.into()],
    );
    CubeRows {
        loss,
        soft,
        hard,
        grad: with_grad.then_some(grad),
    }
}

impl<R, F, I, BT> DistillBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fused_kernel_dtypes() -> &'static [DType] {
        &[DType::F32, DType::F16, DType::BF16]
    }

    fn distill_fused(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> FusedOutput<Self> {
        type T<B, const D: usize> = BurnTensor<B, D>;
        let [n, _v] = student.meta.shape().dims::<2>();
        let dtype = student.dtype;
        let device = student.device.clone();
        let float = |t: CubeTensor<R>| T::<Self, 1>::from_primitive(TensorPrimitive::Float(t));
        // The reduction's factor, on the device (no synchronisation): 1/kept rows for Mean.
        let scale: T<Self, 1> = match (params.reduction, &targets, params.ignore_index) {
            (Reduction::Mean, Some(t), Some(ignore)) => {
                let t = BurnTensor::<Self, 1, Int>::from_primitive(t.clone());
                let kept = t.not_equal_elem(ignore).int().sum().float().cast(dtype);
                kept.clamp_min(1.0).recip()
            }
            (Reduction::Mean, _, _) => T::full([1], 1.0 / n as f64, (&device, dtype)),
            _ => T::full([1], 1.0, (&device, dtype)),
        };
        let has_targets = targets.is_some();
        let rows = launch::<R>(
            student,
            teacher,
            targets,
            scale.clone().into_primitive().tensor(),
            params,
            with_grad,
        );
        let reduce = |t: CubeTensor<R>| -> FloatTensor<Self> {
            let rows = float(t);
            match params.reduction {
                Reduction::None => rows,
                Reduction::Sum => rows.sum(),
                Reduction::Mean => rows.sum() * scale.clone(),
            }
            .into_primitive()
            .tensor()
        };
        FusedOutput {
            parts: DistillParts {
                loss: reduce(rows.loss),
                soft: reduce(rows.soft),
                hard: has_targets.then(|| reduce(rows.hard)),
            },
            grad: rows.grad,
        }
    }
}
