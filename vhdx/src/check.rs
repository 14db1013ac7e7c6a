//! Checking an image (placeholder replaced below).
