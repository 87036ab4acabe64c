//! The outcome of one backend check: shared by the collective checks (`selftest`) and the
//! autograd checks (`autograd::checks`).

use crate::error::CommError;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A collective returned an error the check did not expect.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A collective returned a wrong value or the wrong kind of error (message says which).
    #[error("{0}")]
    Wrong(String),
}

/// Outcome of one check.
pub type CheckResult = std::result::Result<(), CheckError>;
