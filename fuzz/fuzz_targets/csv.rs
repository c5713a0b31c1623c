#![no_main]
//! The csv reader of the file source on arbitrary bytes.

use libfuzzer_sys::fuzz_target;
use weft_core::config::FileFormat;

mod common;

fuzz_target!(|data: &[u8]| common::check(FileFormat::Csv, &[], data));
