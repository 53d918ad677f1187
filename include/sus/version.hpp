// sus — linear-time attention backprop (SUS backprop). Version macros.
#pragma once

#define SUS_VERSION_MAJOR 0
#define SUS_VERSION_MINOR 1
#define SUS_VERSION_PATCH 0
#define SUS_VERSION_STRING "0.1.0"
// Single integer for comparisons: MAJOR * 10000 + MINOR * 100 + PATCH.
#define SUS_VERSION (SUS_VERSION_MAJOR * 10000 + SUS_VERSION_MINOR * 100 + SUS_VERSION_PATCH)
