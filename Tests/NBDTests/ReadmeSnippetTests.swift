import Foundation
import Testing

/// The code of the README and `docs/` cannot rot: every Swift block in them is part of a file
/// of `Snippets/`, which `swift build` compiles; the manifest block names products the package has.
@Suite("README code is compiled")
struct ReadmeSnippetTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The Swift blocks of the README (or of `file`), each as its lines without leading and
    /// trailing blanks.
    static func readmeBlocks(_ file: String = "README.md") throws -> [[String]] {
        let text = try String(contentsOf: root.appendingPathComponent(file), encoding: .utf8)
        var blocks: [[String]] = []
        var current: [String]?
        for line in text.components(separatedBy: "\n") {
            if current == nil, line == "```swift" {
                current = []
            } else if current != nil, line == "```" {
                blocks.append(current!)
                current = nil
            } else {
                current?.append(line)
            }
        }
        return blocks.map { $0.map(Self.trimmed) }
    }

    /// Each snippet's lines, trimmed, without the `// snippet.` markers DocC reads.
    static func snippets() throws -> [String: [String]] {
        let folder = root.appendingPathComponent("Snippets")
        var files: [String: [String]] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: folder.path) where name.hasSuffix(".swift") {
            let text = try String(contentsOf: folder.appendingPathComponent(name), encoding: .utf8)
            files[name] = text.components(separatedBy: "\n").map(trimmed).filter { !$0.hasPrefix("// snippet.") }
        }
        return files
    }

    static func trimmed(_ line: String) -> String { line.trimmingCharacters(in: .whitespaces) }

    static func contains(_ haystack: [String], _ needle: [String]) -> Bool {
        let needle = Array(needle.drop { $0.isEmpty }.reversed().drop { $0.isEmpty }.reversed())
        guard !needle.isEmpty, needle.count <= haystack.count else { return needle.isEmpty }
        return (0...(haystack.count - needle.count)).contains { Array(haystack[$0..<($0 + needle.count)]) == needle }
    }

    @Test func everySwiftBlockIsInASnippet() throws {
        let snippets = try Self.snippets()
        let documents = try FileManager.default.contentsOfDirectory(atPath: Self.root.appendingPathComponent("docs").path)
            .filter { $0.hasSuffix(".md") }.map { "docs/" + $0 }
        var count = 0
        for file in ["README.md"] + documents {
            let blocks = try Self.readmeBlocks(file).filter { $0.first != "// Package.swift" }
            count += blocks.count
            for block in blocks {
                #expect(
                    snippets.values.contains { Self.contains($0, block) },
                    "\(file), not in Snippets/:\n\(block.joined(separator: "\n"))"
                )
            }
        }
        #expect(count >= 15)
    }

    @Test func theManifestBlockNamesRealProducts() throws {
        let manifest = try String(contentsOf: Self.root.appendingPathComponent("Package.swift"), encoding: .utf8)
        let block = try #require(try Self.readmeBlocks().first { $0.first == "// Package.swift" })
        let named = block.compactMap { line -> String? in
            guard let range = line.range(of: ".product(name: \"") else { return nil }
            return String(line[range.upperBound...].prefix { $0 != "\"" })
        }
        #expect(named == ["NBD", "NBDCopy", "NBDServer", "NIOCore"])
        for product in named.dropLast() { #expect(manifest.contains(".library(name: \"\(product)\"")) }
        // No release is tagged: the block follows main, and names the swift-nio this package uses.
        #expect(block.contains { $0.contains("swift-nbd\", branch: \"main\")") })
        let nio = try #require(block.first { $0.hasPrefix(".package(url: \"https://github.com/apple/swift-nio\"") })
        #expect(manifest.contains(nio), "\(nio)")
    }
}
