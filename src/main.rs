fn main() -> std::process::ExitCode {
    onnxopt::cli::main()
}
