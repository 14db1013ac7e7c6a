//! vstor
