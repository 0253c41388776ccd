// `nbd-bench server --tls`: nbdcopy reading SIZE over TLS from `nbd serve` and from
// `nbdkit --tls=require`, both memory exports filled with the same data, the same
// certificates, alternating, median of the rounds, with each server's CPU time beside it.

import Foundation
import NBD

#if canImport(Glibc)
import Glibc
#endif

extension Benchmark {
    static func runServerTLS(_ options: Options) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-bench-\(getpid())")
        let pki = directory.appendingPathComponent("pki").path
        try makeCertificates(in: pki)
        defer { try? FileManager.default.removeItem(at: directory) }
        func tlsURI(_ socket: String) -> String { "nbds+unix:///?socket=\(socket)&tls-certificates=\(pki)&tls-hostname=localhost" }

        let ourSocket = directory.appendingPathComponent("ours.sock").path
        let ours = try start(
            try requireNBDTool(),
            ["serve", "--memory", "\(options.size)", "--socket", ourSocket, "--tls-certificates", pki]
        )
        defer { kill(ours.processIdentifier, SIGKILL) }
        let theirSocket = directory.appendingPathComponent("nbdkit.sock").path
        let nbdkit = try await startNBDKit(socket: theirSocket, ["--tls=require", "--tls-certificates", pki, "memory", "\(options.size)"])
        defer { kill(nbdkit.processIdentifier, SIGKILL) }
        let patternSocket = directory.appendingPathComponent("pattern.sock").path
        let pattern = try await startNBDKit(socket: patternSocket, ["pattern", "\(options.size)"])
        defer { kill(pattern.processIdentifier, SIGKILL) }
        try await waitFor(ourSocket)

        print("filling both servers with \(options.size >> 20) MiB of nbdkit's pattern, over TLS ...")
        for socket in [ourSocket, theirSocket] { _ = try measure("nbdcopy", [NBDURI(socket: patternSocket).description, tlsURI(socket)]) }

        let mib = Double(options.size) / Double(1 << 20)
        print("nbdcopy reading \(Int(mib)) MiB over TLS (X.509, 4 connections), median of \(options.rounds)")
        var runs: [(name: String, seconds: [Double], cpu: [Double])] = [("nbd serve", [], []), ("nbdkit", [], [])]
        for _ in 0..<options.rounds {
            for (index, (socket, pid)) in [(ourSocket, ours.processIdentifier), (theirSocket, nbdkit.processIdentifier)].enumerated() {
                let before = cpuSeconds(of: pid)
                runs[index].seconds.append(try measure("nbdcopy", [tlsURI(socket), "null:"]).seconds)
                runs[index].cpu.append(cpuSeconds(of: pid) - before)
            }
        }
        let rates = runs.map { mib / median($0.seconds) }
        for (run, rate) in zip(runs, rates) {
            print(
                run.name.padding(toLength: 10, withPad: " ", startingAt: 0)
                    + String(format: "%8.1f MiB/s   server CPU %5.2f s", rate, median(run.cpu))
            )
        }
        print(String(format: "ratio %.2f", rates[0] / rates[1]))
    }
}
