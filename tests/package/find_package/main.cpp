// Packaging smoke test: the umbrella header is reachable through sus::sus.
#include <sus/sus.hpp>

#include <cstdio>

int main() {
  std::printf("sus %s\n", SUS_VERSION_STRING);
  return 0;
}
