//! Shared test helpers: the crate's exported conformance suites (`burn_distill::testing`) and
//! their data, under the names the tests use.
#![allow(dead_code, unused_imports)]

pub use burn_distill::testing::{
    Case, GRAD_TOL, LOSS_TOL, assert_golden, close, compare, golden_cases, ints, load_cases,
    mismatches, number, numbers, parse_divergence, parse_reduction, run_case, tensor2, values,
};

pub mod linear;

pub mod sparse {
    pub use burn_distill::testing::sparse::*;
}
