//! The one error type of the crate. Every failure names the argument it is
//! about; `src/python/mod.rs` maps `Kind::Type` to `TypeError`, `Kind::Value` to
//! `ValueError` and `Kind::Memory` to `MemoryError`, so nothing reaches Python
//! as a panic or an abort.

use std::fmt;

/// Which Python exception an [`Error`] becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Wrong type or dtype of an argument (`TypeError`).
    Type,
    /// Wrong value, shape, rank or device of an argument (`ValueError`).
    Value,
    /// A working buffer sized by an argument could not be allocated (`MemoryError`).
    Memory,
}

/// An invalid argument: `arg` is the Python name of the argument, `msg` says
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub arg: &'static str,
    pub msg: String,
}

impl Error {
    /// A `TypeError` about `arg`.
    pub fn type_error(arg: &'static str, msg: impl Into<String>) -> Self {
        Error { kind: Kind::Type, arg, msg: msg.into() }
    }

    /// A `ValueError` about `arg`.
    pub fn value_error(arg: &'static str, msg: impl Into<String>) -> Self {
        Error { kind: Kind::Value, arg, msg: msg.into() }
    }

    /// A `MemoryError`: a buffer sized by `arg` could not be allocated.
    pub fn memory(arg: &'static str, msg: impl Into<String>) -> Self {
        Error { kind: Kind::Memory, arg, msg: msg.into() }
    }
}

/// A zero-filled `Vec` of `n` elements, or a `MemoryError` about `arg`
/// when the allocation fails (where `vec!` would abort the process).
pub fn try_zeros<T: Clone + Default>(arg: &'static str, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::memory(arg, format!("cannot allocate a working buffer of {n} elements of {} bytes", std::mem::size_of::<T>()))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.arg, self.msg)
    }
}

impl std::error::Error for Error {}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
