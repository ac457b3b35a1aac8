//! Following a promoted replica.
