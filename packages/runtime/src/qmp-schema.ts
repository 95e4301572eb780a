// QMP introspection (query-qmp-schema) in QEMU's SchemaInfo shape, generated from what each
// command and event was registered with, so the schema cannot drift from what the server accepts.
//
// A description uses QAPI's own spelling: an object is `{ name: TYPE }`, a name starting with
// '*' is optional, `[TYPE]` is an array, builtins are 'str' | 'int' | 'number' | 'bool' | 'any' |
// 'null', an enum is qmpEnum([...]), and a flat union (QAPI's 'union' with a discriminator) is
// qmpUnion(base, tag, {value: members}).
//
//   query-qmp-schema → [ {name:'migrate', meta-type:'command', arg-type:'3', ret-type:'0'},
//                        {name:'MIGRATION', meta-type:'event', arg-type:'5'},
//                        {name:'0', meta-type:'object', members:[]},
//                        {name:'3', meta-type:'object', members:[{name:'uri', type:'str'},
//                                                                {name:'blk', type:'bool', default:null}]},
//                        {name:'str', meta-type:'builtin', json-type:'string'}, … ]
//
// Non-builtin type names are numbers, as QEMU masks them (qapi/introspect.py without
// --unmask-non-abi-names): clients must not rely on them.

export type QmpBuiltin = 'str' | 'int' | 'number' | 'bool' | 'any' | 'null';

/** The key an enum keeps its values under (a symbol, so no QMP member name can clash with it). */
export const QMP_ENUM_VALUES: unique symbol = Symbol('qmp enum values');

export interface QmpEnum {
  readonly [QMP_ENUM_VALUES]: readonly string[];
}

/** Object members by name; a name starting with '*' is optional (QAPI's spelling). */
export interface QmpMembers {
  readonly [name: string]: QmpType;
}

/** The key a union keeps its description under. */
export const QMP_UNION: unique symbol = Symbol('qmp union');

/** A flat union: the base members, the one (an enum in the base) that says which variant's members follow. */
export interface QmpUnion {
  readonly [QMP_UNION]: { readonly base: QmpMembers; readonly tag: string; readonly variants: Readonly<Record<string, QmpMembers | QmpUnion>> };
}

export type QmpType = QmpBuiltin | readonly [QmpType] | QmpEnum | QmpMembers | QmpUnion;

/** An enum type: the strings a member accepts. */
export function qmpEnum(values: readonly string[]): QmpEnum {
  return { [QMP_ENUM_VALUES]: [...values] };
}

/**
 * A flat union (QAPI 'union'): `tag` is a member of `base` whose value picks the variant whose
 * members come besides the base's (a variant may be a union itself, as SocketAddress is).
 * The tag's enum is made from the variants' names.
 */
export function qmpUnion(base: QmpMembers, tag: string, variants: Record<string, QmpMembers | QmpUnion>): QmpUnion {
  return { [QMP_UNION]: { base: { ...base, [tag]: qmpEnum(Object.keys(variants)) }, tag, variants } };
}

const JSON_TYPES: Record<QmpBuiltin, string> = {
  str: 'string',
  int: 'int',
  number: 'number',
  bool: 'boolean',
  any: 'value',
  null: 'null',
};

/** What a command was registered with; `args` undefined: undescribed (takes anything). */
export interface QmpCommandDescription {
  readonly name: string;
  readonly args: QmpMembers | undefined;
  readonly returns: QmpType;
  readonly allowOob: boolean;
}

export interface QmpEventDescription {
  readonly name: string;
  readonly data: QmpMembers;
}

function isEnum(t: QmpType): t is QmpEnum {
  return typeof t === 'object' && Object.hasOwn(t, QMP_ENUM_VALUES);
}

function isArray(t: QmpType): t is readonly [QmpType] {
  return Array.isArray(t);
}

function isUnion(t: QmpType): t is QmpUnion {
  return typeof t === 'object' && Object.hasOwn(t, QMP_UNION);
}

/** Every member a union's value may carry for the variant `tagValue` (base and variant, flattened). */
function unionMembers(u: QmpUnion, value: Record<string, unknown>): QmpMembers | undefined {
  const { base, tag, variants } = u[QMP_UNION];
  const variant = variants[value[tag] as string];
  if (variant === undefined) return undefined;
  if (!isUnion(variant)) return { ...base, ...variant };
  const inner = unionMembers(variant, value);
  return inner === undefined ? undefined : { ...base, ...inner };
}

/**
 * Check a whole value against its description as QEMU's input visitor does, with its messages
 * (`name` is the member's full name, e.g. "channels[0].addr.port"); undefined when it fits.
 */
export function checkQmpValue(t: QmpType, value: unknown, name: string): string | undefined {
  if (typeof t === 'string') {
    return builtinMatches(t, value) ? undefined : `Invalid parameter type for '${name}', expected: ${builtinExpected(t)}`;
  }
  if (isArray(t)) {
    if (!Array.isArray(value)) return `Invalid parameter type for '${name}', expected: array`;
    for (const [i, item] of value.entries()) {
      const bad = checkQmpValue(t[0], item, `${name}[${i}]`);
      if (bad !== undefined) return bad;
    }
    return undefined;
  }
  if (isEnum(t)) {
    if (typeof value !== 'string') return `Invalid parameter type for '${name}', expected: string`;
    return t[QMP_ENUM_VALUES].includes(value) ? undefined : `Parameter '${name}' does not accept value '${value}'`;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return `Invalid parameter type for '${name}', expected: object`;
  const v = value as Record<string, unknown>;
  let members: QmpMembers | undefined = t as QmpMembers;
  if (isUnion(t)) {
    const { tag } = t[QMP_UNION];
    // The tags first, outer to inner, then the members they select.
    for (let u: QmpType | undefined = t; u !== undefined && isUnion(u); ) {
      const desc: QmpUnion[typeof QMP_UNION] = u[QMP_UNION];
      const { base, tag: innerTag, variants } = desc;
      const bad = Object.hasOwn(v, innerTag) ? checkQmpValue(base[innerTag]!, v[innerTag], `${name}.${innerTag}`) : `Parameter '${name}.${innerTag}' is missing`;
      if (bad !== undefined) return bad;
      u = variants[v[innerTag] as string];
    }
    members = unionMembers(t, v);
    if (members === undefined) return `Parameter '${name}.${tag}' does not accept value '${String(v[tag])}'`;
  }
  const known = new Set<string>();
  for (const [key, type] of Object.entries(members)) {
    const m = memberName(key);
    known.add(m.name);
    if (!Object.hasOwn(v, m.name)) {
      if (!m.optional) return `Parameter '${name}.${m.name}' is missing`;
      continue;
    }
    const bad = checkQmpValue(type, v[m.name], `${name}.${m.name}`);
    if (bad !== undefined) return bad;
  }
  for (const key of Object.keys(v)) if (!known.has(key)) return `Parameter '${name}.${key}' is unexpected`;
  return undefined;
}

/** One member of a described object: its wire name and whether it may be left out. */
export function memberName(key: string): { name: string; optional: boolean } {
  return key.startsWith('*') ? { name: key.slice(1), optional: true } : { name: key, optional: false };
}

/** The json-type a value must have for a builtin (for QEMU's "Invalid parameter type" check). */
export function builtinMatches(t: QmpType, value: unknown): boolean {
  switch (t) {
    case 'str':
      return typeof value === 'string';
    case 'int':
      return typeof value === 'number' && Number.isInteger(value);
    case 'number':
      return typeof value === 'number';
    case 'bool':
      return typeof value === 'boolean';
    case 'null':
      return value === null;
    default:
      return true; // 'any' and composite types: the handler checks
  }
}

/** QEMU's word for a builtin in "expected: …" messages. */
export function builtinExpected(t: QmpType): string | undefined {
  if (typeof t !== 'string') return undefined;
  return { str: 'string', int: 'integer', number: 'number', bool: 'boolean', null: 'null', any: undefined }[t];
}

/** The SchemaInfo list for these commands and events (commands, events, then their types). */
export function qmpSchema(commands: readonly QmpCommandDescription[], events: readonly QmpEventDescription[]): Record<string, unknown>[] {
  const types: Record<string, unknown>[] = [];
  const names = new Map<string, string>(); // structural key → type name
  let next = 0;

  const intern = (key: string, build: (name: string) => Record<string, unknown>): string => {
    const known = names.get(key);
    if (known !== undefined) return known;
    const name = String(next++);
    names.set(key, name);
    types.push(build(name));
    return name;
  };

  const nameOf = (t: QmpType): string => {
    if (typeof t === 'string') {
      // Builtins keep their own names and take no number.
      if (!names.has(`builtin:${t}`)) {
        names.set(`builtin:${t}`, t);
        types.push({ name: t, 'meta-type': 'builtin', 'json-type': JSON_TYPES[t] });
      }
      return t;
    }
    if (isArray(t)) {
      const element = nameOf(t[0]);
      const key = `array:${element}`;
      const known = names.get(key);
      if (known !== undefined) return known;
      const name = `[${element}]`;
      names.set(key, name);
      types.push({ name, 'meta-type': 'array', 'element-type': element });
      return name;
    }
    if (isEnum(t)) {
      const values = t[QMP_ENUM_VALUES];
      return intern(`enum:${JSON.stringify(values)}`, (name) => ({
        name,
        'meta-type': 'enum',
        members: values.map((v) => ({ name: v })),
        values: [...values],
      }));
    }
    const membersOf = (m: QmpMembers): Record<string, unknown>[] =>
      Object.entries(m).map(([key, type]) => {
        const { name, optional } = memberName(key);
        const member: Record<string, unknown> = { name, type: nameOf(type) };
        if (optional) member['default'] = null; // QEMU: an optional member has "default": null
        return member;
      });
    if (isUnion(t)) {
      // QEMU's SchemaInfoObject of a union: the base members, `tag`, and one variant per value.
      const { base, tag, variants } = t[QMP_UNION];
      const members = membersOf(base);
      const cases = Object.entries(variants).map(([value, type]) => ({ case: value, type: nameOf(type) }));
      return intern(`union:${JSON.stringify([members, tag, cases])}`, (name) => ({ name, 'meta-type': 'object', members, tag, variants: cases }));
    }
    const members = membersOf(t as QmpMembers);
    return intern(`object:${JSON.stringify(members)}`, (name) => ({ name, 'meta-type': 'object', members }));
  };

  const entries: Record<string, unknown>[] = [];
  nameOf({}); // the empty object is "0", as in QEMU
  for (const c of commands) {
    const entry: Record<string, unknown> = {
      name: c.name,
      'meta-type': 'command',
      'arg-type': c.args === undefined ? nameOf('any') : nameOf(c.args),
      'ret-type': nameOf(c.returns),
    };
    if (c.allowOob) entry['allow-oob'] = true;
    entries.push(entry);
  }
  for (const e of events) entries.push({ name: e.name, 'meta-type': 'event', 'arg-type': nameOf(e.data) });
  return [...entries, ...types];
}
