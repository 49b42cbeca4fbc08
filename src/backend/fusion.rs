//! burn's `Fusion<B>` wrapper (the default `Wgpu` and `Cuda` types): the fused kernel of `B`
//! registered as one custom operation of the fusion stream.

use core::marker::PhantomData;

use burn::tensor::{
    DType, Int, Shape, Tensor, TensorMetadata,
    ops::{FloatTensor, FloatTensorOps},
};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime,
    stream::{Operation, OperationStreams},
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::{
    DenseCall, DistillBackend, DistillParams, DistillParts, FusedOutput, KernelCall, Reduction,
    SparseCall, SparseInputs, SparseSetup,
};

/// Which kernel a custom operation runs.
#[derive(Clone, Copy, Debug)]
enum Teacher {
    /// The dense kernel: inputs `[student, teacher, targets]`.
    Dense,
    /// The sparse kernel: inputs `[student, indices, log_probs, targets]` (the mask already
    /// folded into the log-probabilities as `−∞`).
    Sparse(SparseSetup),
}

/// The custom operation of both kernels: outputs `[loss, soft, hard, grad]` (`targets`, `hard`
/// and `grad` are placeholders when unused).
#[derive(Clone, Debug)]
struct FusedOp<B> {
    desc: CustomOpIr,
    teacher: Teacher,
    params: DistillParams,
    has_targets: bool,
    with_grad: bool,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + DistillBackend> Operation<B::FusionRuntime> for FusedOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let student = handles.get_float_tensor::<B>(&inputs[0]);
        let targets = self
            .has_targets
            .then(|| handles.get_int_tensor::<B>(&inputs[inputs.len() - 1]));
        let device = B::float_device(&student);
        // Registered only after `B::has_fused_kernel` (`has_sparse_fused_kernel`) accepted the
        // same inputs (it depends on their dtypes, and `k`, alone).
        let call = KernelCall::<B, _, _, _>::new(student, (), targets, self.params);
        let call = call.with_grad(self.with_grad);
        let out = match self.teacher {
            Teacher::Dense => B::distill_fused(
                call.map(|s, (), y| (s, handles.get_float_tensor::<B>(&inputs[1]), y)),
            ),
            Teacher::Sparse(setup) => {
                let teacher = SparseInputs {
                    indices: handles.get_int_tensor::<B>(&inputs[1]),
                    log_probs: handles.get_float_tensor::<B>(&inputs[2]),
                    mask: None,
                    setup,
                };
                B::distill_sparse_fused(call.map(|s, (), y| (s, teacher, y)))
            }
        }
        .unwrap_or_else(|| {
            panic!(
                "burn-distill: the {:?} kernel of {} refused its inputs",
                self.teacher,
                core::any::type_name::<B>()
            )
        });
        let outputs = self
            .desc
            .outputs
            .as_slice()
            .try_into()
            .expect("four outputs");
        register_outputs::<B>(handles, outputs, out, &device);
    }
}

/// A call of `Fusion<B>`: the student's logits and the teacher's inputs of the custom operation.
type FusionCall<B> =
    KernelCall<Fusion<B>, FloatTensor<Fusion<B>>, Vec<FloatTensor<Fusion<B>>>, DistillParams>;

/// Registers the custom operation of `teacher`'s kernel on `[N, V]` `student` logits with the
/// teacher's `inputs` (targets, or zeros in their place, appended) and returns its outputs.
fn register<B: FusionBackend + DistillBackend>(
    name: &'static str,
    call: FusionCall<B>,
    teacher: Teacher,
) -> FusedOutput<Fusion<B>> {
    let KernelCall {
        student,
        teacher: inputs,
        targets,
        settings: params,
        with_grad,
    } = call;
    let dims = student.shape();
    let (n, v) = (dims[0], dims[1]);
    let client = student.client.clone();
    let dtype = student.dtype();
    let has_targets = targets.is_some();
    let targets = targets.unwrap_or_else(|| {
        let device = Fusion::<B>::float_device(&student);
        Tensor::<Fusion<B>, 1, Int>::zeros([n], &device).into_primitive()
    });
    let mut all = vec![student];
    all.extend(inputs);
    all.push(targets);
    let outputs = output_irs::<B>(&client, [n, v], dtype, &params, with_grad);
    let streams = OperationStreams::with_inputs(all.iter());
    let irs: Vec<TensorIr> = all.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &irs, &outputs);
    let op = FusedOp::<B> {
        desc: desc.clone(),
        teacher,
        params,
        has_targets,
        with_grad,
        _backend: PhantomData,
    };
    let outputs = client.register(streams, OperationIr::Custom(desc), op);
    fused_output(outputs, has_targets, with_grad)
}

/// Registers a kernel's `[loss, soft, hard, grad]` (placeholders for the missing ones).
fn register_outputs<B: FusionBackend>(
    handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    [loss, soft, hard, grad]: &[TensorIr; 4],
    out: FusedOutput<B>,
    device: &B::Device,
) {
    let placeholder = |ir: &TensorIr| B::float_zeros(ir.shape.clone(), device, ir.dtype.into());
    handles.register_float_tensor::<B>(&loss.id, out.parts.loss);
    handles.register_float_tensor::<B>(&soft.id, out.parts.soft);
    let hard_t = out.parts.hard.unwrap_or_else(|| placeholder(hard));
    handles.register_float_tensor::<B>(&hard.id, hard_t);
    let grad_t = out.grad.unwrap_or_else(|| placeholder(grad));
    handles.register_float_tensor::<B>(&grad.id, grad_t);
}

/// The four outputs of a fused operation on `[N, V]` logits of `dtype`.
fn output_irs<B: FusionBackend + DistillBackend>(
    client: &burn_fusion::client::GlobalFusionClient<B::FusionRuntime>,
    [n, v]: [usize; 2],
    dtype: DType,
    params: &DistillParams,
    with_grad: bool,
) -> [TensorIr; 4] {
    let rows: Shape = match params.reduction {
        Reduction::PerRow => [n].into(),
        _ => [1].into(),
    };
    let grad_shape: Shape = if with_grad {
        [n, v].into()
    } else {
        [1, 1].into()
    };
    let out = |shape: Shape, dtype| TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let loss_dtype = B::fused_loss_dtype(dtype);
    [
        out(rows.clone(), loss_dtype),
        out(rows.clone(), loss_dtype),
        out(rows, loss_dtype),
        out(grad_shape, B::fused_grad_dtype(dtype)),
    ]
}

/// The registered outputs as a [`FusedOutput`].
fn fused_output<B: FusionBackend>(
    outputs: Vec<FloatTensor<Fusion<B>>>,
    has_targets: bool,
    with_grad: bool,
) -> FusedOutput<Fusion<B>> {
    let [loss, soft, hard, grad]: [FloatTensor<Fusion<B>>; 4] =
        outputs.try_into().expect("four outputs");
    FusedOutput {
        parts: DistillParts {
            loss,
            soft,
            hard: has_targets.then_some(hard),
        },
        grad: with_grad.then_some(grad),
    }
}

impl<B: FusionBackend + DistillBackend> DistillBackend for Fusion<B> {
    inner_capabilities!(B);

    fn distill_fused(call: DenseCall<Self>) -> Option<FusedOutput<Self>> {
        if !Self::has_fused_kernel(&call.student, &call.teacher) || !fits::<B>(&call.student) {
            return None;
        }
        let call = call.map(|s, t, y| (s, vec![t], y));
        Some(register::<B>("burn_distill_fused", call, Teacher::Dense))
    }

    fn distill_sparse_fused(call: SparseCall<Self>) -> Option<FusedOutput<Self>> {
        let k = call.teacher.indices.shape()[1];
        if !B::has_sparse_fused_kernel(call.student.dtype(), k) || !fits::<B>(&call.student) {
            return None;
        }
        let setup = call.teacher.setup;
        let call = call.map(|s, t, y| {
            let indices = t.indices.clone();
            let log_probs = t.folded_log_probs().into_primitive().tensor();
            (s, vec![indices, log_probs], y)
        });
        Some(register::<B>(
            "burn_distill_sparse",
            call,
            Teacher::Sparse(setup),
        ))
    }
}

/// Can `B`'s kernels run on these `[N, V]` logits?
fn fits<B: FusionBackend + DistillBackend>(student: &FloatTensor<Fusion<B>>) -> bool {
    let dims = student.shape();
    B::fused_kernel_fits([dims[0], dims[1]], &Fusion::<B>::float_device(student))
}
