# One case of the bad-input catalogue (tests/bad_input/README.md). The case file's first comment
# lines say what dpart must do:
#   # expect-exit: 2
#   # expect: 7:14: layer "fc2": unknown op "lnear" (did you mean "linear"?)
# `expect` is LINE:COL: MESSAGE (or LINE: MESSAGE for CSV, which has no columns); dpart must print
# "<file>:LINE:COL: error: MESSAGE" on stderr, <file> being the case's input. `expect-file:
# MESSAGE` is an error naming the file alone; `expect-stderr: TEXT` any text stderr must hold.
# Nothing may be printed on stdout.
#
# How the case runs depends on its KIND (its folder):
#   model     dpart inspect CASE
#   cluster   dpart inspect --cluster CASE
#   plan      dpart replay CASE -m MODEL -c CLUSTER -n 1
#   scenario  dpart replay PLAN -m MODEL -c CLUSTER -n 1 --scenario CASE
#   cli       the case's `# run: ARGS` line; `# input: NAME` makes the rest of the file the input
#             (written to the case's scratch folder as NAME); ARGS may name {input}, {src} (the
#             source tree) and {tmp} (an empty scratch folder)
# MODEL, CLUSTER and PLAN default to plans/models/seed-mlp.toml, plans/clusters/cpu-local.toml and
# tests/bad_input/fixtures/seed-mlp-cpu-local.plan.toml; `# model: PATH`, `# cluster: PATH` and
# `# plan: PATH` (relative to the source tree) choose others.
cmake_minimum_required(VERSION 3.25)  # policies NEW: a quoted "model" is a string, not a variable
# Read as one string, not a CMake list: messages may hold ';' and unbalanced brackets.
file(READ "${CASE}" text)
string(FIND "${text}" "\n# input: " input_at)
if(input_at GREATER -1)
  string(SUBSTRING "${text}" 0 ${input_at} header)
else()
  set(header "${text}")
endif()

function(directive name out)
  if(header MATCHES "(^|\n)# ${name}: ([^\n]*)")
    set(${out} "${CMAKE_MATCH_2}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

get_filename_component(case_name "${CASE}" NAME_WE)
set(tmp "${SCRATCH}/${KIND}.${case_name}")
file(REMOVE_RECURSE "${tmp}")
file(MAKE_DIRECTORY "${tmp}")

directive(model model)
directive(cluster cluster)
directive(plan plan)
if(model STREQUAL "")
  set(model "plans/models/seed-mlp.toml")
endif()
if(cluster STREQUAL "")
  set(cluster "plans/clusters/cpu-local.toml")
endif()
if(plan STREQUAL "")
  set(plan "tests/bad_input/fixtures/seed-mlp-cpu-local.plan.toml")
endif()

set(input "${CASE}")
if(KIND STREQUAL "model")
  set(args inspect "${CASE}")
elseif(KIND STREQUAL "cluster")
  set(args inspect --cluster "${CASE}")
elseif(KIND STREQUAL "plan")
  set(args replay "${CASE}" -m "${SRC}/${model}" -c "${SRC}/${cluster}" -n 1)
elseif(KIND STREQUAL "scenario")
  set(args replay "${SRC}/${plan}" -m "${SRC}/${model}" -c "${SRC}/${cluster}" -n 1 --scenario "${CASE}")
elseif(KIND STREQUAL "cli")
  if(NOT header MATCHES "(^|\n)# run:")
    message(FATAL_ERROR "${CASE}: a cli case needs a '# run: ARGS' line (ARGS may be empty)")
  endif()
  directive(run run)
  if(input_at GREATER -1)
    string(REGEX MATCH "\n# input: ([^\n]*)\n" line "${text}")
    set(input "${tmp}/${CMAKE_MATCH_1}")
    string(LENGTH "${line}" line_length)
    math(EXPR body_at "${input_at} + ${line_length}")
    string(SUBSTRING "${text}" ${body_at} -1 body)
    file(WRITE "${input}" "${body}")
  endif()
  foreach(placeholder src input tmp)
    if(placeholder STREQUAL "src")
      set(value "${SRC}")
    else()
      set(value "${${placeholder}}")
    endif()
    string(REPLACE "{${placeholder}}" "${value}" run "${run}")
  endforeach()
  separate_arguments(args UNIX_COMMAND "${run}")
else()
  message(FATAL_ERROR "unknown case kind ${KIND}")
endif()

directive(expect-exit expect_exit)
set(expect "")
if(header MATCHES "(^|\n)# expect: ([0-9]+):([0-9]+): ([^\n]*)")
  set(expect "${input}:${CMAKE_MATCH_2}:${CMAKE_MATCH_3}: error: ${CMAKE_MATCH_4}")
elseif(header MATCHES "(^|\n)# expect: ([0-9]+): ([^\n]*)")
  set(expect "${input}:${CMAKE_MATCH_2}: error: ${CMAKE_MATCH_3}")
elseif(header MATCHES "(^|\n)# expect-file: ([^\n]*)")
  set(expect "${input}: error: ${CMAKE_MATCH_2}")
elseif(header MATCHES "(^|\n)# expect-stderr: ([^\n]*)")
  set(expect "${CMAKE_MATCH_2}")
  foreach(placeholder src input tmp)
    if(placeholder STREQUAL "src")
      set(value "${SRC}")
    else()
      set(value "${${placeholder}}")
    endif()
    string(REPLACE "{${placeholder}}" "${value}" expect "${expect}")
  endforeach()
endif()
if(expect_exit STREQUAL "" OR expect STREQUAL "")
  message(FATAL_ERROR "${CASE}: the case must start with '# expect-exit: N' and '# expect: LINE:COL: MESSAGE' "
                      "(or expect-file / expect-stderr)")
endif()

execute_process(COMMAND "${DPART}" ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                WORKING_DIRECTORY "${tmp}" TIMEOUT 120)
if(NOT rc STREQUAL expect_exit)
  message(FATAL_ERROR "exit code ${rc}, expected ${expect_exit}\ncommand: ${DPART} ${args}\nstderr: ${err}\nstdout: ${out}")
endif()
string(FIND "${err}" "${expect}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "stderr does not contain the expected message\nexpected: ${expect}\nstderr:   ${err}")
endif()
if(NOT out STREQUAL "")
  message(FATAL_ERROR "a rejected input must print nothing on stdout, got:\n${out}")
endif()
message(STATUS "ok: ${err}")
