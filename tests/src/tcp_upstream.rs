//! A tcp echo upstream (owned by the tcp data-plane work).
