# embed.cmake — turns a file into a C array (cmake -DIN=file -DOUT=file.c -DNAME=symbol -P embed.cmake).
# Used for the dashboard page: no xxd, no build-time tools beyond CMake itself.
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" n)
math(EXPR len "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," arr "${hex}")
file(WRITE "${OUT}" "/* generated from ${IN} by src/serve/embed.cmake: do not edit */\n#include <stddef.h>\nconst unsigned char ${NAME}[] = {${arr}0x00};\nconst size_t ${NAME}_len = ${len};\n")
