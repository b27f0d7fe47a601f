//! Helpers for tests on the bed.
