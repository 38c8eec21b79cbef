// The one translation unit that compiles toml++'s implementation (TOML_HEADER_ONLY=0 is set
// for the whole project), so that dpart needs no toml++ shared library at run time.
#define TOML_IMPLEMENTATION 1
#include "dpart/io/toml.hpp"
