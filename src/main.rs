fn main() -> std::process::ExitCode {
    // The process is the command line's own: megabyte blocks get mappings of their own, so
    // that what a model's run frees goes back to the system (`exec::allocator`).
    onnxopt::exec::map_large_blocks();
    onnxopt::cli::main()
}
