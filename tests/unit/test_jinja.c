/* test_jinja.c — the chat-template interpreter (src/tok/jinja.c) against references that no part
 * of strata computed:
 *   - transformers' apply_chat_template(tokenize=False) renderings of the real Qwen3 and Llama 3
 *     templates (tests/fixtures/chat/NAME.json, templates from $STRATA_CACHE/tokenizers);
 *   - Jinja2 3.1.6 renderings, in transformers' environment (ImmutableSandboxedEnvironment,
 *     trim_blocks, lstrip_blocks, loopcontrols, generation tag, json.dumps tojson), of
 *     hand-written templates exercising one feature each (k_cases below);
 * plus errors: line:column positions, raise_exception, unsupported constructs, limits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "strata/jinja.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------- */
/* helpers                                                                                        */

/* Parses tpl and renders it with vars (JSON text, NULL = none). Returns the status; on success
 * *out is the malloc'ed rendering. */
static int render(const char *tpl, const char *vars_json, char **out, st_err *err) {
    *out = NULL;
    json_t *vars = NULL;
    if (vars_json) {
        json_error_t je;
        vars = json_loads(vars_json, 0, &je);
        assert_non_null(vars);
    }
    jinja_template *t = NULL;
    int rc = jinja_template_parse(&t, tpl, strlen(tpl), err);
    if (!rc) {
        jinja_render_opts opts = {.now = 1721980800}; /* 2024-07-26 08:00:00 UTC */
        rc = jinja_render_ex(t, vars, &opts, out, NULL, err);
    }
    jinja_template_free(t);
    json_decref(vars);
    return rc;
}

/* Asserts that tpl fails with code and that the message contains want. */
static void expect_error(const char *tpl, const char *vars, int code, const char *want) {
    st_err err = {0};
    char *out = NULL;
    int rc = render(tpl, vars, &out, &err);
    if (rc != code || !strstr(err.msg, want)) {
        print_error("template %s\n  rc %d (want %d), msg '%s' (want '%s'), out '%s'\n", tpl, rc, code,
                    err.msg, want, out ? out : "");
        free(out);
        fail();
    }
    assert_null(out);
}

static char *path2(const char *env, const char *dflt, const char *a, const char *b) {
    const char *root = getenv(env);
    char *x = st_path_join(root ? root : dflt, a);
    char *y = st_path_join(x, b);
    free(x);
    return y;
}

/* ---------------------------------------------------------------------------------------------- */
/* fixtures: real templates vs transformers                                                       */

static void run_chat_fixture(const char *name) {
    char file[64];
    snprintf(file, sizeof file, "%s.json", name);
    char *fx = path2("STRATA_FIXTURES", "tests/fixtures", "chat", file);
    char *dir = path2("STRATA_CACHE", ".cache", "tokenizers", name);
    char *cfg = st_path_join(dir, "tokenizer_config.json");
    if (!st_path_exists(cfg)) {
        print_message("%s missing: run tools/fetch-test-assets.sh\n", cfg);
        free(fx);
        free(dir);
        free(cfg);
        skip();
    }
    json_error_t je;
    json_t *root = json_load_file(fx, 0, &je);
    assert_non_null(root);
    st_err err = {0};
    chat_template *ct = NULL;
    assert_int_equal(chat_template_load(&ct, cfg, &err), 0);
    size_t i;
    json_t *c;
    int n = 0;
    json_array_foreach(json_object_get(root, "cases"), i, c) {
        json_t *kw = json_object();
        const char *key;
        json_t *val;
        json_object_foreach(c, key, val) {
            if (strcmp(key, "messages") && strcmp(key, "add_generation_prompt") && strcmp(key, "rendered"))
                json_object_set(kw, key, val);
        }
        char *out = NULL;
        int rc = chat_template_render(ct, json_object_get(c, "messages"),
                                      json_is_true(json_object_get(c, "add_generation_prompt")), kw,
                                      NULL, &out, &err);
        const char *want = json_string_value(json_object_get(c, "rendered"));
        if (rc || strcmp(out, want)) {
            print_error("%s case %zu: rc %d %s\n got: [%s]\nwant: [%s]\n", name, i, rc, err.msg,
                        out ? out : "", want);
            fail();
        }
        free(out);
        json_decref(kw);
        n++;
    }
    assert_true(n > 0);
    chat_template_free(ct);
    json_decref(root);
    free(fx);
    free(dir);
    free(cfg);
}

static void test_fixture_qwen3(void **state) {
    (void)state;
    run_chat_fixture("qwen3");
}

static void test_fixture_llama3(void **state) {
    (void)state;
    run_chat_fixture("llama3");
}

/* ---------------------------------------------------------------------------------------------- */
/* features: hand-written templates vs Jinja2                                                     */

typedef struct render_case {
    const char *name;
    const char *tpl;
    const char *vars; /* NULL: k_default_vars */
    const char *want; /* Jinja2's rendering */
} render_case;

static const char *k_default_vars =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Sys\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nplan\\n</think>\\n\\nanswer\", \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": \"\303\251\"}}}]}, {\"role\": \"tool\", \"content\": \"r\"}], \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"tools\": null}";

static const render_case k_cases[] = {
    {"loop_vars",
     "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}|{% endfor %}",
     NULL,
     "10TrueFalse443|21FalseFalse432|32FalseFalse421|43FalseTrue410|"},
    {"loop_prev_next",
     "{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}>{{ (loop.nextitem or {'role': 'END'}).role }};{% endfor %}",
     NULL,
     "->user;system>assistant;user>tool;assistant>END;"},
    {"loop_cycle_changed",
     "{% for x in [1,2,3] %}{{ loop.cycle('odd', 'even') }}{{ loop.changed(x > 1) }} {% endfor %}",
     NULL,
     "oddTrue evenTrue oddFalse "},
    {"for_else",
     "{% for x in [] %}a{% else %}empty{% endfor %}{% for x in undefined_var %}a{% else %}none{% endfor %}",
     NULL,
     "emptynone"},
    {"for_filter_iterable",
     "{% for m in messages | selectattr('role', 'equalto', 'user') %}{{ m.content }}{% endfor %}|{% for m in messages | rejectattr('role', 'eq', 'user') | list %}{{ m.role }},{% endfor %}",
     NULL,
     "hi|system,assistant,tool,"},
    {"for_if_clause",
     "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}:{{ m.role }} {% endfor %}",
     NULL,
     "1/3:user 2/3:assistant 3/3:tool "},
    {"for_unpack",
     "{% for k, v in {'a': 1, 'b': [1, 2]}.items() %}{{ k }}={{ v }};{% endfor %}{% for a, b in [[1, 2], [3, 4]] %}{{ a * b }} {% endfor %}{% for k, v in {'x': 'y'} | items %}{{ k }}{{ v }}{% endfor %}",
     NULL,
     "a=1;b=[1, 2];2 12 xy"},
    {"for_nested_loop",
     "{% for a in [1,2] %}{% for b in [3,4] %}{{ loop.index }}{{ a }}{{ b }} {% endfor %}{{ loop.index }}|{% endfor %}",
     NULL,
     "113 214 1|123 224 2|"},
    {"for_scope",
     "{% set x = 1 %}{% for i in [1,2] %}{{ x }}{% set x = x + 1 %}{{ x }};{% endfor %}{{ x }}",
     NULL,
     "12;12;1"},
    {"break_continue",
     "{% for i in range(6) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}",
     NULL,
     "023"},
    {"if_elif_else",
     "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %} {% endfor %}",
     NULL,
     "one two many "},
    {"namespace",
     "{% set ns = namespace(x=1, y='a') %}{% for i in range(3) %}{% set ns.x = ns.x * 2 %}{% endfor %}{{ ns.x }}{{ ns.y }} {{ ns }}",
     NULL,
     "8a <Namespace {'x': 8, 'y': 'a'}>"},
    {"set_block",
     "{% set x %}\n  block {{ 1 + 2 }}\n{% endset %}[{{ x }}]{% set y | upper %}shout{% endset %}{{ y }}",
     NULL,
     "[  block 3\n]SHOUT"},
    {"set_tuple",
     "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = 1, 2 %}{{ c }}",
     NULL,
     "12(1, 2)"},
    {"macro_defaults",
     "{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '\?') }} {{ greet(name='c', punct='.') }}",
     NULL,
     "Hello a! Hello b\? Hello c."},
    {"macro_closure_varargs",
     "{% macro m() %}{{ a }}{% endmacro %}{% set a = 3 %}{{ m() }}{% macro n(a, b=a) %}[{{ a }}|{{ b }}]{% endmacro %}{{ n(1) }}{% macro v(a) %}[{{ a }}{{ varargs }}{{ kwargs }}]{% endmacro %}{{ v(1, 2, x=3) }}",
     NULL,
     "3[1|1][1(2,){'x': 3}]"},
    {"macro_recursive",
     "{% macro rec(n) %}{% if n > 0 %}{{ n }}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(5) }}",
     NULL,
     "54321"},
    {"arithmetic",
     "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7 / 2 }} {{ 6 / 2 }} {{ 1.5 * 2 }} {{ 'ab' * 3 }} {{ [1] * 3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }} {{ 1 ~ 2 * 3 }} {{ true + 1 }}",
     NULL,
     "3 -4 1 2 1024 0.5 3.5 3.0 3.0 ababab [1, 1, 1] 3.0 0.5 4 64 16 2"},
    {"concat_and_str",
     "{{ 'a' ~ 1 ~ 2.5 ~ none ~ true ~ [1, 'x'] ~ {'k': 'v'} ~ (1,) ~ undefined_var }}",
     NULL,
     "a12.5NoneTrue[1, 'x']{'k': 'v'}(1,)"},
    {"comparisons",
     "{{ 1 < 2 < 3 }} {{ 1 < 3 < 2 }} {{ 'a' in 'abc' }} {{ 'z' not in 'abc' }} {{ 1 in [1,2] }} {{ 'k' in {'k':1} }} {{ 1 == 1.0 }} {{ true == 1 }} {{ none == none }} {{ [1,2] == [1,2] }} {{ (1,2) == [1,2] }} {{ 'b' > 'a' }}",
     NULL,
     "True False True True True True True True True True False True"},
    {"logic_ternary",
     "{{ 'a' if false }}|{{ 'a' if true else 'b' }}|{{ none or 'x' }}|{{ 0 and 1 }}|{{ not none }}|{{ 5 if 1 > 2 else 6 if 2 > 1 else 7 }}|{{ not 1 == 2 }}",
     NULL,
     "|a|x|0|True|6|True"},
    {"literals",
     "{{ \"it's\" }} {{ ['it\\'s', 'say \"hi\"', 'both \\' \"'] }} {{ ['\\n', '\\t', '\\\\', '\303\251', '\\x00', '\\u00e9'] }} {{ 1_000 + 0x10 + 0o10 + 0b10 }} {{ 1.5e3 }} {{ True }}{{ False }}{{ None }} {{ 'abc' 'def' }}",
     NULL,
     "it's [\"it's\", 'say \"hi\"', 'both \\' \"'] ['\\n', '\\t', '\\\\', '\303\251', '\\x00', '\303\251'] 1026 1500.0 TrueFalseNone abcdef"},
    {"floats",
     "{{ 0.1 + 0.2 }} {{ 1e16 }} {{ 1e15 }} {{ 1.0 }} {{ -0.0 }} {{ 1e-5 }} {{ 0.0001 }} {{ 123456789.123 }} {{ 1/3 }} {{ 2.5e-10 }}",
     NULL,
     "0.30000000000000004 1e+16 1000000000000000.0 1.0 -0.0 1e-05 0.0001 123456789.123 0.3333333333333333 2.5e-10"},
    {"attr_subscript",
     "{{ messages[1].content }} {{ messages[1]['content'] }} {{ messages.0.role }} {{ {'a': {'b': {'c': 'deep'}}}.a.b.c }} {{ [[1, [2, 3]]][0][1][0] }} {{ messages[1].nope }}|{{ messages[1].nope is defined }}|{{ none.foo }}|{{ [1][5] }}",
     NULL,
     "hi hi system deep 2 |False||"},
    {"slicing",
     "{{ messages[1:] | length }} {{ messages[::-1][0].role }} {{ messages[-1].role }} {{ 'hello'[1:3] }} {{ 'hello'[::-1] }} {{ [1,2,3,4,5][1:4:2] }} {{ 'h\303\251llo'[1] }} {{ [1,2,3][5:10] }} {{ 'abcdef'[-2:] }} {{ 'abcdef'[1:-1:2] }}",
     NULL,
     "3 tool tool el olleh [2, 4] \303\251 [] ef bd"},
    {"filters_string",
     "{{ '  x  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ 'Hello' | upper }}{{ 'Hello' | lower }}|{{ 'hello world' | capitalize }}|{{ 'hello wORLD-foo(bar' | title }}|{{ 'aaa' | replace('a', 'b', 2) }}|{{ 'x' | string }}{{ 5 | string }}|{{ 'abc' | reverse }}|{{ '<a>' | e }}|{{ '%s-%d' | format('a', 3) }}",
     NULL,
     "x|hi|HELLOhello|Hello world|Hello World-Foo(Bar|bba|x5|cba|&lt;a&gt;|a-3"},
    {"filters_seq",
     "{{ [1,2,3] | first }}{{ [1,2,3] | last }}|{{ [3,1,2] | sort | list }}|{{ [1, 2, 3] | join(', ') }}|{{ messages | map(attribute='role') | join('/') }}|{{ ['a','b'] | map('upper') | list }}|{{ [1,2,2,3,1] | unique | list }}|{{ [3,1,2] | max }}{{ [3,1,2] | min }}{{ [1,2,3] | sum }}|{{ [1,2,3] | reverse | list }}|{{ messages | length }}{{ messages | count }}|{{ 'ab' | list }}",
     NULL,
     "13|[1, 2, 3]|1, 2, 3|system/user/assistant/tool|['A', 'B']|[1, 2, 3]|316|[3, 2, 1]|44|['a', 'b']"},
    {"filters_select",
     "{{ [1, 2, 3] | select('odd') | list }} {{ [1, 2, 3] | reject('odd') | list }} {{ [0, 1, '', 'a'] | select | list }} {{ messages | selectattr('tool_calls') | list | length }} {{ messages | selectattr('role', 'in', ['user', 'tool']) | map(attribute='content') | list }} {{ messages | map(attribute='nope', default='D') | list }}",
     NULL,
     "[1, 3] [2] [1, 'a'] 1 ['hi', 'r'] ['D', 'D', 'D', 'D']"},
    {"filters_default",
     "{{ x | default('d') }} {{ none | default('d') }} {{ '' | default('d', true) }} {{ x | d }}|{{ messages[1].nope | default('dflt') }}",
     NULL,
     "d None d |dflt"},
    {"filters_numbers",
     "{{ '42' | int }} {{ '42.7' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} {{ 3.9 | int }} {{ '0x1A' | int(0, 16) }} {{ '3.5' | float }} {{ 'a' | float }} {{ -1 | abs }} {{ 2.567 | round(2) }} {{ 2.5 | round }} {{ 2.1 | round(0, 'ceil') }}",
     NULL,
     "42 42 0 7 3 26 3.5 0.0 1 2.57 2.0 3.0"},
    {"filters_dict",
     "{{ {'b': 1, 'A': 2, 'c': 0} | dictsort }} {{ {'b': 1, 'A': 2, 'c': 0} | dictsort(by='value', reverse=true) }} {{ {'a': 1} | items | list }} {{ dict(a=1, b='x') }}",
     NULL,
     "[('A', 2), ('b', 1), ('c', 0)] [('A', 2), ('b', 1), ('c', 0)] [('a', 1)] {'a': 1, 'b': 'x'}"},
    {"filters_indent",
     "{{ 'a\\nb\\n\\nc' | indent(2) }}|{{ 'a\\nb' | indent(2, true) }}|{{ 'a\\n\\nb' | indent(width='--', blank=true) }}",
     NULL,
     "a\n  b\n\n  c|  a\n  b|a\n--\n--b"},
    {"tojson_default",
     "{{ {'a': 1, 'b': [1, 2.5, none, true, \"q\\\"uote\"], 'c': '\303\251\\n\\x01'} | tojson }}",
     NULL,
     "{\"a\": 1, \"b\": [1, 2.5, null, true, \"q\\\"uote\"], \"c\": \"\303\251\\n\\u0001\"}"},
    {"tojson_options",
     "{{ {'a': 1, 'b': [1, {}, []]} | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|{{ [1, 2] | tojson(separators=(',', ':')) }}|{{ '\303\251' | tojson(ensure_ascii=true) }}|{{ (1, 'a') | tojson }}",
     NULL,
     "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    {},\n    []\n  ]\n}|{\"a\": 2, \"b\": 1}|[1,2]|\"\\u00e9\"|[1, \"a\"]"},
    {"tojson_messages",
     "{{ messages[2].tool_calls[0].function.arguments | tojson }}{{ messages | tojson(indent=1) }}",
     NULL,
     "{\"a\": 1, \"b\": \"\303\251\"}[\n {\n  \"role\": \"system\",\n  \"content\": \"Sys\"\n },\n {\n  \"role\": \"user\",\n  \"content\": \"hi\"\n },\n {\n  \"role\": \"assistant\",\n  \"content\": \"<think>\\nplan\\n</think>\\n\\nanswer\",\n  \"tool_calls\": [\n   {\n    \"type\": \"function\",\n    \"function\": {\n     \"name\": \"f\",\n     \"arguments\": {\n      \"a\": 1,\n      \"b\": \"\303\251\"\n     }\n    }\n   }\n  ]\n },\n {\n  \"role\": \"tool\",\n  \"content\": \"r\"\n }\n]"},
    {"tests",
     "{{ x is defined }} {{ x is undefined }} {{ none is none }} {{ 'a' is string }} {{ {} is mapping }} {{ [] is iterable }} {{ [] is sequence }} {{ 1 is number }} {{ 1 is integer }} {{ 1.0 is integer }} {{ true is boolean }} {{ true is true }} {{ false is false }} {{ 0 is false }} {{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 'a' is eq 'a' }} {{ 'a' is equalto 'b' }} {{ 2 is gt 1 }} {{ 'ABC' is upper }} {{ 'a' is in 'abc' }} {{ 'x' is not none }} {{ none is sameas none }}",
     NULL,
     "False True True True True True True True True False True True True False True True True True False True True True True True"},
    {"str_methods",
     "{{ 'a,b,,c'.split(',') }} {{ ' a  b '.split() }} {{ 'a b c'.split(' ', 1) }} {{ 'a,b,c'.rsplit(',', 1) }} {{ '  x '.strip() }}|{{ 'xyx'.strip('x') }}|{{ '\\n\\nab\\n'.lstrip('\\n') }}|{{ 'ab  '.rstrip() }}| {{ 'abc'.startswith('a') }} {{ 'abc'.endswith(('x','c')) }} {{ 'abc'.upper() }} {{ 'ABC'.lower() }} {{ 'a-b'.replace('-', '+') }} {{ 'hello world'.title() }} {{ 'abcabc'.find('c') }} {{ 'aaa'.count('a') }} {{ '-'.join(['a','b']) }}",
     NULL,
     "['a', 'b', '', 'c'] ['a', 'b'] ['a', 'b c'] ['a,b', 'c'] x|y|ab\n|ab| True True ABC abc a+b Hello World 2 3 a-b"},
    {"str_format",
     "{{ '{} and {}'.format('a', 'b') }} {{ '{0}{1}{0}'.format('x', 'y') }} {{ '{name}!'.format(name='n') }} {{ '{{}}'.format() }} {{ '%s=%05.2f' % ('pi', 3.14159) }}",
     NULL,
     "a and b xyx n! {} pi=03.14"},
    {"dict_methods",
     "{% set d = {'a': 1} %}{{ d.get('a') }} {{ d.get('b') }} {{ d.get('b', 2) }} {{ d.keys() | list }} {{ d.values() | list }} {{ d.items() | list }} {{ d.items() }} {{ d['a'] }} {{ d.a }}",
     NULL,
     "1 None 2 ['a'] [1] [('a', 1)] dict_items([('a', 1)]) 1 1"},
    {"ws_control",
     "{%- if true -%}\n   A\n{%- endif -%}\n   B {{- ' c ' -}} d {#- comment -#} e",
     NULL,
     "AB c de"},
    {"trim_lstrip_blocks",
     "  {% if true %}\n  x\n  {% endif %}\ny\n    {# a comment #}\nz\n  {%+ if true %}keep{% endif %}\n",
     NULL,
     "  x\ny\nz\n  keep"},
    {"raw_block",
     "a {% raw %}{{ not parsed }} {% if %}{% endraw %} b",
     NULL,
     "a {{ not parsed }} {% if %} b"},
    {"with_filter_generation",
     "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a }}|{% filter upper %}hello {{ 'x' }}{% endfilter %}|{% generation %}gen{% endgeneration %}",
     NULL,
     "3|HELLO X|gen"},
    {"undefined_lenient",
     "{{ x }}|{{ x | length }}|{{ x | list }}|{{ x | join }}|{{ x | string }}|{{ x | trim }}|{{ 'a' in x }}|{{ x == none }}|{{ not x }}|{{ x is iterable }}",
     NULL,
     "|0|[]||||False|False|True|True"},
    {"generators_truthy",
     "{{ messages | selectattr('role', 'eq', 'x') is true }}{% if messages | selectattr('role', 'eq', 'x') %}T{% endif %}{% set g = messages | map(attribute='role') %}{{ g | first }}{{ g | list }}",
     NULL,
     "FalseTsystem['user', 'assistant', 'tool']"},
    {"range_repr",
     "{{ range(3) | list }} {{ range(1, 10, 3) | list }} {{ range(3) }} {{ range(10)[2:5] }}",
     NULL,
     "[0, 1, 2] [1, 4, 7] range(0, 3) range(2, 5)"},
    {"markup",
     "{{ 'a' | safe + '<b>' }} {{ '<b>' + ('a' | safe) }} {{ ('<x>' | safe) ~ '<' }}",
     NULL,
     "a&lt;b&gt; &lt;b&gt;a <x><"},
    {"list_concat",
     "{% set x = [1, 2] + [3] %}{{ x }}{{ x | length }}{% set t = (1, 2) %}{{ t + (3,) }}{{ t | list }}",
     NULL,
     "[1, 2, 3]3(1, 2, 3)[1, 2]"},
    {"unicode_case",
     "{{ '\303\237' | upper }} {{ '\303\211COLE' | lower }} {{ '\303\251mile zola' | title }} {{ '\303\251a' | capitalize }} {{ 'Stra\303\237e'.upper() }}",
     NULL,
     "SS \303\251cole \303\211mile Zola \303\211a STRASSE"},
    {"crlf_trailing_newline",
     "a\015\n{% if true %}\015\nb\015\n{% endif %}\015\nc\n",
     NULL,
     "a\nb\nc"},
    {"top_level_kwargs",
     "{% if enable_thinking is defined and enable_thinking is false %}nothink{% endif %}{{ bos_token }}{{ tools is none }}",
     "{\"messages\": [{\"role\": \"system\", \"content\": \"Sys\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"<think>\\nplan\\n</think>\\n\\nanswer\", \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": \"\303\251\"}}}]}, {\"role\": \"tool\", \"content\": \"r\"}], \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"tools\": null, \"enable_thinking\": false}",
     "nothink<s>True"},
};

static void test_features(void **state) {
    (void)state;
    int bad = 0;
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        const render_case *c = &k_cases[i];
        st_err err = {0};
        char *out = NULL;
        int rc = render(c->tpl, c->vars ? c->vars : k_default_vars, &out, &err);
        if (rc || strcmp(out, c->want)) {
            print_error("case %s: rc %d %s\n got: [%s]\nwant: [%s]\n", c->name, rc, err.msg,
                        out ? out : "", c->want);
            bad++;
        }
        free(out);
    }
    assert_int_equal(bad, 0);
}

/* strftime_now uses the local clock: fixed time, UTC zone. */
static void test_strftime_now(void **state) {
    (void)state;
    setenv("TZ", "UTC", 1);
    tzset();
    st_err err = {0};
    char *out = NULL;
    assert_int_equal(render("{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %H:%M') }}", NULL, &out, &err), 0);
    assert_string_equal(out, "26 Jul 2024|2024-07-26 08:00");
    free(out);
    /* the Llama 3.1 idiom */
    assert_int_equal(render("{%- if not date_string is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}"
                            "{%- endif %}Today Date: {{ date_string }}", NULL, &out, &err), 0);
    assert_string_equal(out, "Today Date: 26 Jul 2024");
    free(out);
    assert_int_equal(render("{{ date_string }}", "{\"date_string\": \"1 Jan 2000\"}", &out, &err), 0);
    assert_string_equal(out, "1 Jan 2000");
    free(out);
}

/* ---------------------------------------------------------------------------------------------- */
/* errors                                                                                         */

static void test_parse_errors(void **state) {
    (void)state;
    /* unknown filter / test names fail when the template is parsed, as in Jinja2 ... */
    expect_error("a\nb\n{{ 'x' | nosuchfilter }}", NULL, ST_ERR_UNSUPPORTED, "chat template 3:10: unsupported filter 'nosuchfilter'");
    expect_error("{% for m in [] %}{{ m is prime }}{% endfor %}", NULL, ST_ERR_UNSUPPORTED, "1:26: unsupported test 'prime'");
    expect_error("x\n  {% include 'other.jinja' %}", NULL, ST_ERR_UNSUPPORTED, "2:6: unsupported tag 'include'");
    expect_error("{% for x in y recursive %}{% endfor %}", NULL, ST_ERR_UNSUPPORTED, "1:15: recursive for loops");
    expect_error("{% frobnicate %}", NULL, ST_ERR_FORMAT, "1:4: unknown tag 'frobnicate'");
    expect_error("{% if x %}open", NULL, ST_ERR_FORMAT, "expected 'elif'");
    expect_error("{% for x in y %}{% endif %}{% endfor %}", NULL, ST_ERR_FORMAT, "1:20: unknown tag 'endif'");
    expect_error("{{ 1 + }}", NULL, ST_ERR_FORMAT, "1:8: unexpected end of print statement");
    expect_error("{{ 'abc }}", NULL, ST_ERR_FORMAT, "1:4: unterminated string");
    expect_error("{{ x ", NULL, ST_ERR_FORMAT, "1:1: unexpected end of template");
    expect_error("{{ (1 }}", NULL, ST_ERR_FORMAT, "1:7: unexpected '}', expected ')'");
    expect_error("{{ 1) }}", NULL, ST_ERR_FORMAT, "1:5: unexpected ')'");
    expect_error("{# never closed", NULL, ST_ERR_FORMAT, "1:1: missing end of comment tag");
    expect_error("{% break %}", NULL, ST_ERR_FORMAT, "1:4: 'break' outside loop");
    expect_error("{% set true = 1 %}", NULL, ST_ERR_FORMAT, "can't assign");
    expect_error("{% macro m(a=1, b) %}{% endmacro %}", NULL, ST_ERR_FORMAT, "non-default argument follows default argument");
    expect_error("{{ f(*args) }}", NULL, ST_ERR_UNSUPPORTED, "*args");
    expect_error("{{ x is defined is defined }}", NULL, ST_ERR_FORMAT, "cannot chain");
    expect_error("{{ '\xff' }}", NULL, ST_ERR_FORMAT, "not valid UTF-8");
}

static void test_runtime_errors(void **state) {
    (void)state;
    /* Jinja2 raises on these, so strata does too (never different output) */
    expect_error("\n  {{ x.y }}", NULL, ST_ERR_FORMAT, "chat template 2:8: 'x' is undefined");
    expect_error("{{ messages[0].nope.deeper }}", k_default_vars, ST_ERR_FORMAT, "'dict object' has no attribute 'nope'");
    expect_error("{{ 'a' + 1 }}", NULL, ST_ERR_FORMAT, "1:8: unsupported operand type(s) for +: 'str' and 'int'");
    expect_error("{{ x + 1 }}", NULL, ST_ERR_FORMAT, "'x' is undefined");
    expect_error("{{ 1 / 0 }}", NULL, ST_ERR_FORMAT, "division by zero");
    expect_error("{{ 'a' < 1 }}", NULL, ST_ERR_FORMAT, "'<' not supported between instances of 'str' and 'int'");
    expect_error("{{ none | length }}", NULL, ST_ERR_FORMAT, "has no len()");
    expect_error("{% for a, b in [[1, 2, 3]] %}{% endfor %}", NULL, ST_ERR_FORMAT, "too many values to unpack");
    expect_error("{% set x = 1 %}{% set x.y = 2 %}", NULL, ST_ERR_FORMAT, "1:23: cannot assign attribute on non-namespace object");
    expect_error("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}", NULL, ST_ERR_FORMAT, "macro 'm' takes not more than 1 argument(s)");
    expect_error("{{ 1 | tojson(2, 3, 4, 5, 6) }}", NULL, ST_ERR_FORMAT, "tojson() takes at most 4 argument(s)");
    expect_error("{{ x | tojson }}", NULL, ST_ERR_FORMAT, "Undefined is not JSON serializable");
    expect_error("{{ range(1000000) | length }}", NULL, ST_ERR_FORMAT, "Range too big");
    expect_error("{{ x.y() }}", "{\"x\": {}}", ST_ERR_FORMAT, "no attribute 'y'");
    /* the template's own errors: the request does not fit the template */
    expect_error("{% if messages | length > 1 %}\n{{ raise_exception('Conversation roles must alternate') }}{% endif %}",
                 k_default_vars, ST_ERR_ARG, "chat template 2:4: Conversation roles must alternate");
    /* valid Jinja2 that strata does not implement: an error, not a guess */
    expect_error("{% set l = [1] %}{{ l.append(2) }}", NULL, ST_ERR_UNSUPPORTED, "list.append is not allowed");
    expect_error("{{ [1, 2] | reverse }}", NULL, ST_ERR_UNSUPPORTED, "rendering a list_reverseiterator");
    expect_error("{{ 'x'.center(9) }}", NULL, ST_ERR_UNSUPPORTED, "unsupported str method 'center'");
    expect_error("{{ '{:>4}'.format(1) }}", NULL, ST_ERR_UNSUPPORTED, "format specs");
    expect_error("{{ 2 ** 64 }}", NULL, ST_ERR_UNSUPPORTED, "integer overflow");
    expect_error("{{ ['a'] | map('wordwrap') | list }}", NULL, ST_ERR_UNSUPPORTED, "unsupported filter 'wordwrap'");
    expect_error("{{ 'a' is sameas 'a' }}", NULL, ST_ERR_UNSUPPORTED, "sameas");
    /* ... but only when executed inside {% if %} and inline ifs (Jinja2 3's soft frames), and
     * for Jinja2 builtins strata lacks (Jinja2 compiles those) */
    expect_error("{% if true %}{{ x | nosuchfilter }}{% endif %}", NULL, ST_ERR_UNSUPPORTED, "1:21: unsupported filter 'nosuchfilter'");
    expect_error("{{ 'x' | wordwrap }}", NULL, ST_ERR_UNSUPPORTED, "1:10: unsupported filter 'wordwrap'");
    st_err err = {0};
    char *out = NULL;
    assert_int_equal(render("{% if x is defined %}{{ x | nosuchfilter }}{% endif %}"
                            "{{ 'a' if true else x is prime }}{% for m in [] %}{{ m | wordwrap }}{% endfor %}",
                            NULL, &out, &err), 0);
    assert_string_equal(out, "a");
    free(out);
    /* limits */
    expect_error("{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}", NULL, ST_ERR_LIMIT, "maximum recursion depth exceeded");
    expect_error("{{ 'ab' * 1000000000000 }}", NULL, ST_ERR_LIMIT, "too large");
}

/* The rendering of a failed template leaves nothing behind; a template renders many times. */
static void test_reuse(void **state) {
    (void)state;
    const char *src = "{% for m in messages %}{{ m.role }}:{{ m.content | trim }};{% endfor %}";
    jinja_template *t = NULL;
    st_err err = {0};
    assert_int_equal(jinja_template_parse(&t, src, strlen(src), &err), 0);
    for (int i = 0; i < 50; i++) {
        json_t *vars = json_pack("{s:[{s:s,s:s},{s:s,s:i}]}", "messages", "role", "user", "content", " hi ",
                                 "role", "assistant", "content", i);
        char *out = NULL, want[64];
        size_t n = 0;
        assert_int_equal(jinja_render(t, vars, &out, &n, &err), 0);
        snprintf(want, sizeof want, "user:hi;assistant:%d;", i);
        assert_string_equal(out, want);
        assert_int_equal(n, strlen(want));
        free(out);
        json_decref(vars);
    }
    json_t *bad = json_pack("{s:i}", "messages", 3);
    char *out = NULL;
    assert_int_equal(jinja_render(t, bad, &out, NULL, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "'int' object is not iterable"));
    assert_null(out);
    json_decref(bad);
    assert_int_equal(jinja_render(t, NULL, &out, NULL, &err), 0); /* messages undefined: empty loop */
    assert_string_equal(out, "");
    free(out);
    jinja_template_free(t);
}

/* ---------------------------------------------------------------------------------------------- */
/* chat_template_load: where the template and the special tokens come from                       */

static char *write_tmp(const char *dir, const char *name, const char *text) {
    char *p = st_path_join(dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

static void test_load_config(void **state) {
    (void)state;
    char dir[] = "/tmp/strata_jinja_XXXXXX";
    assert_non_null(mkdtemp(dir));
    st_err err = {0};
    chat_template *ct = NULL;
    char *out = NULL;
    json_t *msgs = json_pack("[{s:s,s:s}]", "role", "user", "content", "hi");

    /* AddedToken dicts, null tokens (undefined), a named list with default + tool_use */
    char *cfg = write_tmp(dir, "tokenizer_config.json",
                          "{\"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<s>\"}, \"eos_token\": \"</s>\","
                          " \"unk_token\": null, \"chat_template\": ["
                          "{\"name\": \"default\", \"template\": \"{{ bos_token }}D{{ unk_token is defined }}{{ tools is none }}{{ messages[0].content }}{{ eos_token }}\"},"
                          "{\"name\": \"tool_use\", \"template\": \"T{{ tools | length }}{{ enable_thinking }}\"}]}");
    assert_int_equal(chat_template_load(&ct, cfg, &err), 0);
    assert_int_equal(chat_template_render(ct, msgs, 1, NULL, NULL, &out, &err), 0);
    assert_string_equal(out, "<s>DFalseTruehi</s>");
    free(out);
    json_t *kw = json_pack("{s:[i,i],s:b}", "tools", 1, 2, "enable_thinking", 0);
    assert_int_equal(chat_template_render(ct, msgs, 0, kw, NULL, &out, &err), 0);
    assert_string_equal(out, "T2False");
    free(out);
    json_decref(kw);
    kw = json_pack("{s:i}", "messages", 1);
    assert_int_equal(chat_template_render(ct, msgs, 0, kw, NULL, &out, &err), ST_ERR_ARG);
    json_decref(kw);
    chat_template_free(ct);

    /* the one-shot helper, and chat_template.jinja overriding the config field */
    assert_int_equal(chat_template_render_config(cfg, msgs, 1, NULL, &out, &err), 0);
    assert_string_equal(out, "<s>DFalseTruehi</s>");
    free(out);
    char *jinja = write_tmp(dir, "chat_template.jinja", "J{{ messages | length }}{% if add_generation_prompt %}+{% endif %}\n");
    assert_int_equal(chat_template_render_config(cfg, msgs, 1, NULL, &out, &err), 0);
    assert_string_equal(out, "J1+");
    free(out);
    unlink(jinja);
    free(jinja);

    /* no template at all; a broken one names the file and position */
    unlink(cfg);
    free(cfg);
    cfg = write_tmp(dir, "tokenizer_config.json", "{\"eos_token\": \"</s>\"}");
    assert_int_equal(chat_template_load(&ct, cfg, &err), ST_ERR_MISSING);
    unlink(cfg);
    free(cfg);
    cfg = write_tmp(dir, "tokenizer_config.json", "{\"chat_template\": \"ok\\n{{ x | nope }}\"}");
    assert_int_equal(chat_template_load(&ct, cfg, &err), ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "tokenizer_config.json: chat template 2:8: unsupported filter 'nope'"));
    unlink(cfg);
    free(cfg);
    rmdir(dir);
    json_decref(msgs);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_qwen3),
        cmocka_unit_test(test_fixture_llama3),
        cmocka_unit_test(test_features),
        cmocka_unit_test(test_strftime_now),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_runtime_errors),
        cmocka_unit_test(test_reuse),
        cmocka_unit_test(test_load_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
