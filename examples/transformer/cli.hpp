// cli — the small command-line parser shared by examples/train.cpp and examples/variance.cpp,
// plus what both mains share (nats → bits, the error-reporting main).
//
//   cli::Args args(argc, argv);              // --name value, --name=value, or a bare --flag
//   int n = args.get("n", 512);               // typed, with a default
//   bool quick = args.flag("quick");
//   args.finish();                            // throws on flags nobody asked for (typos)
#pragma once

#include <sus/sus.hpp>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cli {

class Args {
 public:
  Args(int argc, char** argv) {
    for (int a = 1; a < argc; ++a) {
      std::string s = argv[a];
      if (s.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument '" + s + "' (flags are --name value)");
      s = s.substr(2);
      const std::size_t eq = s.find('=');
      if (eq != std::string::npos) {
        values_[s.substr(0, eq)] = s.substr(eq + 1);
      } else if (a + 1 < argc && std::string(argv[a + 1]).rfind("--", 0) != 0) {
        values_[s] = argv[++a];
      } else {
        values_[s] = "";  // a bare flag
      }
    }
  }

  bool has(const std::string& name) {
    used_.insert(name);
    return values_.count(name) > 0;
  }
  bool flag(const std::string& name) { return has(name); }

  std::string get(const std::string& name, const std::string& fallback) {
    return has(name) ? values_[name] : fallback;
  }
  std::string get(const std::string& name, const char* fallback) { return get(name, std::string(fallback)); }
  template <class T>
  T get(const std::string& name, T fallback) {
    if (!has(name)) return fallback;
    return parse<T>(name, values_[name]);
  }
  /// A comma-separated list, e.g. --n 256,512,1024.
  template <class T>
  std::vector<T> list(const std::string& name, const std::vector<T>& fallback) {
    if (!has(name)) return fallback;
    std::vector<T> out;
    std::stringstream ss(values_[name]);
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(parse<T>(name, item));
    return out;
  }

  /// Throws if a flag was given that no get/flag/has asked about.
  void finish() const {
    for (const auto& kv : values_)
      if (!used_.count(kv.first)) throw std::invalid_argument("unknown flag --" + kv.first);
  }

 private:
  template <class T>
  static T parse(const std::string& name, const std::string& text) {
    std::istringstream in(text);
    T v{};
    in >> v;
    if (!in || !in.eof()) throw std::invalid_argument("flag --" + name + ": cannot parse '" + text + "'");
    return v;
  }

  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
};

inline sus::Budget parse_budget(const std::string& s) {
  if (s == "paper") return sus::Budget::paper;
  if (s == "waterfill") return sus::Budget::waterfill;
  throw std::invalid_argument("budget '" + s + "' is not paper or waterfill");
}

inline sus::Draw parse_draw(const std::string& s) {
  if (s == "independent") return sus::Draw::independent;
  if (s == "systematic") return sus::Draw::systematic;
  throw std::invalid_argument("draw '" + s + "' is not independent or systematic");
}

/// Natural log of 2: a loss in nats divided by this is in bits.
constexpr double kLn2 = 0.69314718055994530942;

/// Runs a program's body; an exception becomes "PROGRAM: error: what" on stderr and exit code 1.
template <class Body>
int run_main(const char* program, Body body) {
  try {
    return body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace cli
