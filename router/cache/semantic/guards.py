"""Guards against near-duplicates that mean something else.

Sentence embeddings put "What is 15% of 80?" and "What is 15% of 90?" close together; a cache that answers one
with the other is wrong. Each guard compares one kind of detail that embeddings blur and that changes the answer;
a cached entry may answer a request only when every guard passes (`conflict(a, b)` is None). The guards are
plain word rules, chosen on benchmarks/data/semantic_cache_eval.jsonl (what each one buys is measured by
benchmarks/bench_semantic_cache.py):

  numbers    the numbers must be the same (digits, number words and ordinals read as values: "5" == "five")
  units      the same units (canonical names: "km" == "kilometers")
  negation   the same count of negations (not, no, never, without, n't, ...)
  entities   every capitalized word or acronym of one text (names, places, products; well-known names of
             countries, cities, languages and tools in any case) appears in the other
  roles      the same content words in another order ("can a dog get fleas from a cat" vs "... a cat ... a dog")
  order      names and units that both mention appear in the same order ("from EUR to USD" vs "from USD to EUR")
  antonyms   one text must not hold a word whose opposite is in the other (increase / decrease, before / after,
             yesterday / tomorrow, ...; or the word with a reversing prefix: zip / unzip, lock / unlock)
  verbatim   quoted strings and code-like tokens (snake_case, a.b, f(x)) must be the same

They err on the side of a miss: a miss costs one generation, a false hit a wrong answer. Known misses they cause:
a question turned around with the same words ("Paris is in which country?" / "Which country is Paris in?": roles),
aliases ("United States" / "US"), and negations that paraphrase ("little money" / "don't have much money").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*|\d[\d,]*(?:\.\d+)?|[$€£¥%°]")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*")
_QUOTED = re.compile(r"[\"\u201c\u201d`]([^\"\u201c\u201d`]{1,200})[\"\u201c\u201d`]")
_CODE_TOKEN = re.compile(r"\b\w+(?:[._]\w+)+\b|\b\w+\(\)?")

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000, "million": 10**6,
    "billion": 10**9, "trillion": 10**12, "dozen": 12, "half": 0.5, "quarter": 0.25, "twice": 2, "double": 2,
    "triple": 3, "single": 1, "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "once": 1, "thrice": 3,
    # Shapes name their number of sides ("angles of a pentagon").
    "triangle": 3, "pentagon": 5, "hexagon": 6, "heptagon": 7, "octagon": 8, "nonagon": 9, "decagon": 10,
}
# "one" is also a pronoun ("which one", "the best one"): read as a number only next to a noun-like word is too
# much; it is left out, and "a"/"an" are never numbers.
_NOT_NUMBERS = {"one", "second"}  # "which one", "a second opinion": ambiguous words, ignored

# Canonical unit per spelling.
_UNITS = {}
for _canonical, _spellings in {
    "m": "m meter meters metre metres", "km": "km kilometer kilometers kilometre kilometres kms",
    "cm": "cm centimeter centimeters centimetre centimetres", "mm": "mm millimeter millimeters millimetre",
    "mile": "mi mile miles", "ft": "ft foot feet", "inch": "in. inch inches", "yard": "yd yard yards",
    "kg": "kg kilo kilos kilogram kilograms kilogramme", "g": "g gram grams gramme", "mg": "mg milligram milligrams",
    "lb": "lb lbs pound pounds", "oz": "oz ounce ounces", "ton": "ton tons tonne tonnes",
    "l": "l liter liters litre litres", "ml": "ml milliliter milliliters millilitre", "gallon": "gal gallon gallons",
    "cup": "cup cups", "tbsp": "tbsp tablespoon tablespoons", "tsp": "tsp teaspoon teaspoons",
    "celsius": "celsius centigrade °c", "fahrenheit": "fahrenheit °f", "kelvin": "kelvin",
    "second": "sec secs seconds", "minute": "min mins minute minutes", "hour": "hr hrs hour hours",
    "day": "day days", "week": "week weeks", "month": "month months", "year": "yr yrs year years",
    "decade": "decade decades", "century": "century centuries",
    "usd": "$ usd dollar dollars buck bucks", "eur": "€ eur euro euros", "gbp": "£ gbp pound-sterling sterling",
    "jpy": "¥ jpy yen", "percent": "% percent percentage", "degree": "° degree degrees",
    "byte": "byte bytes", "kb": "kb kilobyte kilobytes", "mb": "mb megabyte megabytes",
    "gb": "gb gigabyte gigabytes", "tb": "tb terabyte terabytes", "bit": "bit bits",
    "mph": "mph", "kph": "kph km/h", "watt": "w watt watts", "kw": "kw kilowatt kilowatts", "kwh": "kwh",
    "volt": "v volt volts", "amp": "amp amps ampere amperes", "hz": "hz hertz", "ghz": "ghz gigahertz",
    "mhz": "mhz megahertz", "calorie": "calorie calories kcal", "acre": "acre acres", "hectare": "hectare hectares",
}.items():
    for _s in _spellings.split():
        _UNITS[_s] = _canonical
# Single letters are units only right after a number ("5 m", "3 g"); elsewhere they are words.
_SHORT_UNITS = {s for s in _UNITS if len(s) == 1 and s.isalpha()} | {"in."}

_NEGATIONS = {"not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without", "cannot",
              "can't", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't", "won't", "wouldn't",
              "shouldn't", "couldn't", "hasn't", "haven't", "hadn't", "mustn't", "needn't", "ain't", "shan't"}

# Pairs of words whose swap changes the question. Each side is a set of spellings.
_ANTONYM_PAIRS = [
    ("increase increases increasing raise raising", "decrease decreases decreasing lower lowering reduce reducing"),
    ("before", "after"), ("yesterday", "tomorrow"), ("last previous past", "next upcoming future"),
    ("earlier", "later"), ("morning", "evening night"), ("first", "last"), ("early", "late"),
    ("during", "after before"), ("rise rises sunrise", "set sets sunset"), ("fastest quickest", "slowest"),
    ("hottest warmest", "coldest"), ("oldest", "youngest newest"), ("older", "younger newer"),
    ("maximum max highest largest biggest most", "minimum min lowest smallest least fewest"),
    ("best", "worst"), ("more", "less fewer"), ("better", "worse"),
    ("hot hotter warm warmer", "cold colder cool cooler"),
    ("buy buying purchase", "sell selling"), ("up", "down"), ("add adding", "remove removing delete deleting"),
    ("enable enabling", "disable disabling"), ("encrypt encryption", "decrypt decryption"),
    ("import importing", "export exporting"), ("upload uploading", "download downloading"),
    ("start starting", "stop stopping"), ("open opening", "close closing"),
    ("male men man boys boy", "female women woman girls girl"),
    ("north northern", "south southern"), ("east eastern", "west western"), ("left", "right"),
    ("above", "below"), ("inside", "outside"), ("input", "output"), ("push", "pull"),
    ("win winning won", "lose losing lost"),
    ("advantages pros benefits", "disadvantages cons drawbacks downsides"), ("true", "false"),
    ("faster fast quicker", "slower slow"), ("cheap cheaper cheapest", "expensive pricier"),
    ("internal", "external"), ("ascending", "descending"), ("lowercase", "uppercase"), ("client", "server"),
    ("debit", "credit"), ("show", "hide"), ("visible shown", "hidden"), ("follow", "unfollow"),
    ("positive", "negative"), ("send sending", "receive receiving"),
    ("sunrise", "sunset"), ("summer", "winter"), ("spring", "autumn fall"), ("uphill", "downhill"),
    ("borrow", "lend"), ("employer", "employee"), ("parent", "child"), ("teacher", "student"),
    ("landlord", "tenant"), ("wet", "dry"), ("compress", "decompress"), ("serialize", "deserialize"),
    ("encode", "decode"), ("inhale", "exhale"), ("arrive arrival", "depart departure"),
]
_ANTONYMS: dict[str, set[str]] = {}
for _left, _right in _ANTONYM_PAIRS:
    for _a, _b in ((_left, _right), (_right, _left)):
        for _w in _a.split():
            _ANTONYMS.setdefault(_w, set()).update(_b.split())

# Capitalized words that are not names: what sentences start with, pronouns, titles of common things.
# "Earth" and "World" name the default scope of most questions ("in the world" == "on Earth").
_NOT_ENTITIES = {"i", "i'm", "i've", "i'd", "i'll", "ok", "okay", "ai", "earth", "world"}

# Names users often type in lowercase: countries, big cities, languages, programming languages and tools. Read
# as entities in any case.
_KNOWN_NAMES = frozenset("""
afghanistan albania algeria angola argentina armenia australia austria bangladesh belgium bolivia brazil bulgaria
cambodia cameroon canada chile china colombia croatia cuba cyprus czechia denmark ecuador egypt england estonia
ethiopia finland france georgia germany ghana greece guatemala haiti honduras hungary iceland india indonesia iran
iraq ireland israel italy jamaica japan jordan kazakhstan kenya korea kuwait laos latvia lebanon libya lithuania
luxembourg madagascar malaysia mali malta mexico moldova mongolia morocco mozambique myanmar nepal netherlands
nicaragua niger nigeria norway pakistan panama paraguay peru philippines poland portugal qatar romania russia
rwanda scotland senegal serbia singapore slovakia slovenia somalia spain sudan sweden switzerland syria taiwan
tanzania thailand tunisia turkey uganda ukraine uruguay uzbekistan venezuela vietnam wales yemen zambia zimbabwe
africa asia europe antarctica
london paris berlin madrid rome tokyo beijing shanghai moscow sydney toronto chicago boston seattle dubai delhi
mumbai istanbul cairo lagos nairobi lisbon vienna prague amsterdam brussels dublin oslo stockholm helsinki
english spanish french german italian portuguese chinese mandarin japanese korean arabic hindi russian dutch
python java javascript typescript ruby rust golang kotlin swift scala haskell perl php csharp cpp matlab
linux windows macos ubuntu debian fedora android ios docker kubernetes react vue angular django flask mysql
postgresql postgres sqlite mongodb redis excel chrome firefox safari
""".split())


@dataclass(frozen=True, slots=True)
class Features:
    """What the guards compare, read once per text."""

    words: frozenset[str]  # lowercased
    numbers: tuple[float, ...]  # sorted
    units: tuple[str, ...]  # sorted canonical names
    ordered: tuple[str, ...]  # entities and units in the order they appear (lowercased/canonical)
    num_negations: int
    entities: frozenset[str]  # lowercased capitalized words and acronyms (not sentence-initial)
    antonym_words: frozenset[str]
    verbatim: frozenset[str]  # quoted strings and code-like tokens
    content: tuple[str, ...]  # sorted content words (stopwords left out)
    content_order: tuple[str, ...]  # the same, in text order


@lru_cache(maxsize=4096)
def features(text: str) -> Features:
    tokens = [(m.group(), m.start()) for m in _WORD.finditer(text)]
    sentence_starts = {0} | {m.end() for m in _SENTENCE_END.finditer(text)}
    words, numbers, units, ordered, entities, antonym_words = set(), [], [], [], set(), set()
    num_negations = 0
    previous_number = False
    for i, (raw, start) in enumerate(tokens):
        low = raw.lower().replace("\u2019", "'")
        words.add(low)
        if raw[0].isdigit():
            numbers.append(float(raw.replace(",", "")))
            previous_number = True
            continue
        unit = _UNITS.get(low)
        if unit is not None and (low not in _SHORT_UNITS or previous_number):
            units.append(unit)
            ordered.append(unit)
        elif low in _NUMBER_WORDS and low not in _NOT_NUMBERS:
            numbers.append(float(_NUMBER_WORDS[low]))
            previous_number = True
            continue
        previous_number = False
        if low in _NEGATIONS or low.endswith("n't"):
            num_negations += 1
        if low in _ANTONYMS:
            antonym_words.add(low)
        initial = start in sentence_starts or (start > 0 and text[:start].rstrip().endswith(("\"", "(", "-")))
        capitalized = any(c.isupper() for c in raw)
        acronym = len(raw) > 1 and raw.isupper()
        if (low in _KNOWN_NAMES or (capitalized and (acronym or not initial or any(c.isupper() for c in raw[1:])))
                and low not in _NOT_ENTITIES):
            entities.add(low)
            if unit is None:
                ordered.append(low)
    verbatim = {m.group(1).strip().lower() for m in _QUOTED.finditer(text)}
    verbatim |= {m.group() for m in _CODE_TOKEN.finditer(text) if not m.group().replace(".", "").isdigit()}
    content_order = tuple(t.lower() for t, _ in tokens if t.lower() not in _STOPWORDS)
    return Features(frozenset(words), tuple(sorted(numbers)), tuple(sorted(units)), tuple(ordered), num_negations,
                    frozenset(entities), frozenset(antonym_words), frozenset(verbatim), tuple(sorted(content_order)),
                    content_order)


def conflict(a: str, b: str) -> str | None:
    """The name of the first guard that tells `a` and `b` apart ("numbers", "units", ...), or None when every
    guard passes."""
    fa, fb = features(a), features(b)
    if fa.numbers != fb.numbers:
        return "numbers"
    if fa.units != fb.units and fa.units and fb.units:  # "how long" vs "how many minutes" may be one question
        return "units"
    if fa.num_negations != fb.num_negations:
        return "negation"
    if not _all_named(fa.entities, fb.words) or not _all_named(fb.entities, fa.words):
        return "entities"
    if fa.content == fb.content and fa.content_order != fb.content_order:
        return "roles"
    if _order_differs(fa.ordered, fb.ordered):
        return "order"
    for word in fa.antonym_words:
        if _ANTONYMS[word] & fb.words and word not in fb.words:
            return "antonyms"
    for word in fb.antonym_words:
        if _ANTONYMS[word] & fa.words and word not in fa.words:
            return "antonyms"
    if _reversed_by_prefix(fa.words, fb.words) or _reversed_by_prefix(fb.words, fa.words):
        return "antonyms"
    if fa.verbatim != fb.verbatim:
        return "verbatim"
    return None


# Prefixes that turn a word into its opposite: zip/unzip, lock/unlock, enable/disable, activate/deactivate.
_REVERSING_PREFIXES = ("un", "dis", "de", "in", "im", "non", "anti")


def _reversed_by_prefix(a: frozenset[str], b: frozenset[str]) -> bool:
    """`b` holds a word of `a` with a reversing prefix, and not the word itself."""
    return any(len(w) >= 3 and p + w in b and w not in b and p + w not in a for w in a for p in _REVERSING_PREFIXES)


def _all_named(entities: frozenset[str], words: frozenset[str]) -> bool:
    """Every entity is among `words`, or one of them extends it by a suffix ("Africa" ~ "African",
    "Germany" ~ "German")."""
    for entity in entities:
        if entity in words:
            continue
        stem = entity[:-1] if len(entity) >= 6 else entity
        if not any(w.startswith(stem) and len(w) - len(entity) <= 3 for w in words):
            return False
    return True


def _order_differs(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """The items both texts name, in their first-appearance order, differ in order."""
    shared = set(a) & set(b)
    if len(shared) < 2:
        return False
    first_a = [x for i, x in enumerate(a) if x in shared and x not in a[:i]]
    first_b = [x for i, x in enumerate(b) if x in shared and x not in b[:i]]
    return first_a != first_b


GUARDS = ("numbers", "units", "negation", "entities", "roles", "order", "antonyms", "verbatim")

# Function words: what "the same words in another order" leaves out.
_STOPWORDS = frozenset("""
a an the is are was were be been am do does did to of in on at for by with from into onto than as and or but if
it its this that these those what which who whom whose how why when where can could should would will shall may
might must i me my we our you your he she they them his her their there here so very just about up out
""".split())


def normalize(text: str) -> str:
    """The text as the exact-match fast path compares it: case and whitespace folded."""
    return " ".join(text.lower().split())

