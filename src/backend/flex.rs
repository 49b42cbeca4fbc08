//! Flex: the CPU kernels of [`crate::kernel`] on the tensors' memory, zero-copy (the methods
//! are the CPU backends' shared ones, `cpu::host_kernels!`).

use std::borrow::Cow;

use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;

use super::cpu::{HostFloats, host_kernels};
use crate::DistillBackend;
use crate::kernel::real::Real;

impl HostFloats for Flex {
    fn row_major<R: Real>(tensor: &FloatTensor<Self>) -> Option<Cow<'_, [R]>> {
        if tensor.dtype() != R::dtype() {
            return None;
        }
        Some(if tensor.is_contiguous() {
            Cow::Borrowed(tensor.as_slice::<R>()?)
        } else {
            Cow::Owned(tensor.to_contiguous().as_slice::<R>()?.to_vec())
        })
    }

    fn unique_mut<R: Real>(tensor: &mut FloatTensor<Self>) -> Option<&mut [R]> {
        if tensor.dtype() != R::dtype() || !tensor.is_contiguous() {
            return None;
        }
        tensor.try_storage_mut::<R>()
    }
}

impl DistillBackend for Flex {
    host_kernels!();
}
