'use strict';
// Validates an AsyncAPI 3 document with the official parser (@asyncapi/parser), then checks
// every message example (payload and headers) and every payload schema's own `examples`
// with Ajv, under JSON Schema 2020-12 and draft-07 alike (the AsyncAPI 3.0 ruleset does not
// validate examples itself).
// Usage: node validate.cjs <node-prefix> <asyncapi.yaml> [--dump-payloads]
// Exits 1 on any error or warning, after printing them all; info and hints are only printed.
// With --dump-payloads, prints {messageId: resolvedPayloadSchema} as JSON on stdout.
const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const [prefix, file, ...flags] = process.argv.slice(2);
const req = createRequire(path.resolve(prefix, 'package.json'));
const { Parser, DiagnosticSeverity } = req('@asyncapi/parser');
const Ajv07 = req('ajv').default;
const Ajv2020 = req('ajv/dist/2020').default;
const addFormats = req('ajv-formats').default;

const stripParserKeys = (v) =>
  Array.isArray(v)
    ? v.map(stripParserKeys)
    : v && typeof v === 'object'
      ? Object.fromEntries(
          Object.entries(v)
            .filter(([k]) => !k.startsWith('x-parser-'))
            .map(([k, x]) => [k, stripParserKeys(x)]),
        )
      : v;

// A payload is either a plain schema or a multi-format {schemaFormat, schema} object.
const payloadSchema = (json) => (json && json.schemaFormat ? json.schema : json);

// Compiles `schema` under both dialects; returns [dialect, validateFn] pairs.
function compileBoth(schema) {
  // strict: unknown keywords (typos) are errors; `required` may name properties declared elsewhere.
  const options = { allErrors: true, strict: true, strictRequired: false, allowUnionTypes: true };
  const { $schema, ...draft07 } = schema;
  return [
    ['2020-12', addFormats(new Ajv2020(options)).compile(schema)],
    ['draft-07', addFormats(new Ajv07(options)).compile(draft07)],
  ];
}

function checkExamples(document, report) {
  for (const m of document.allMessages()) {
    const schema = payloadSchema(stripParserKeys(m.payload()?.json()));
    const headers = m.headers() ? stripParserKeys(m.headers().json()) : { type: 'object' };
    let payloadValidators = [];
    try {
      payloadValidators = schema ? compileBoth(schema) : [];
    } catch (err) {
      report(`message ${m.id()} payload schema`, [{ instancePath: '', message: err.message }]);
    }
    const headersValidator = addFormats(new Ajv07({ allErrors: true, strict: false })).compile(
      headers,
    );
    const cases = (schema?.examples ?? []).map((p, i) => [`payload schema examples[${i}]`, p]);
    m.examples().all().forEach((ex, i) => {
      if (ex.hasPayload()) cases.push([`examples[${i}] (${ex.name()}) payload`, ex.payload()]);
      if (ex.hasHeaders() && !headersValidator(ex.headers())) {
        report(`message ${m.id()} examples[${i}] headers`, headersValidator.errors);
      }
    });
    for (const [where, value] of cases) {
      for (const [dialect, validate] of payloadValidators) {
        if (!validate(value)) report(`message ${m.id()} ${where} (${dialect})`, validate.errors);
      }
    }
  }
}

(async () => {
  const source = path.resolve(file);
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(source, 'utf8'), {
    source,
  });
  const names = ['error', 'warning', 'info', 'hint'];
  let failed = document === undefined;
  for (const d of diagnostics) {
    const { line, character } = d.range.start;
    const where = `${path.relative(process.cwd(), d.source || source)}:${line + 1}:${character + 1}`;
    console.error(`${where} ${names[d.severity]} ${d.code}: ${d.message} (at ${d.path.join('.')})`);
    if (d.severity <= DiagnosticSeverity.Warning) failed = true;
  }
  if (document !== undefined) {
    checkExamples(document, (where, errors) => {
      failed = true;
      for (const e of errors) {
        console.error(`${file}: error example-invalid: ${where}: ${e.instancePath || '/'} ${e.message}`);
      }
    });
  }
  if (failed) {
    console.error(`${file}: INVALID`);
    process.exit(1);
  }
  if (flags.includes('--dump-payloads')) {
    const out = {};
    for (const m of document.allMessages()) out[m.id()] = stripParserKeys(m.payload().json());
    process.stdout.write(JSON.stringify(out, null, 2) + '\n');
  }
  console.error(`${file}: valid AsyncAPI ${document.version()}, examples valid`);
})().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(2);
});
