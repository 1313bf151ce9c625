"""ModelNaming against real HF ids of the built-in families, config ids and bad input."""

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tunix_zoo import registry
from tunix_zoo.errors import ModelNameError, UnknownModelError, ZooError
from tunix_zoo.naming import ModelNaming

CATEGORY_OF_FAMILY = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "llama3": "llama3",
    "llama3p1": "llama3",
    "llama3p2": "llama3",
    "qwen2p5": "qwen2p5",
    "qwen3": "qwen3",
}

# (HF id, model_name, family, version, config id)
HF_IDS = [
    ("google/gemma-2b", "gemma-2b", "gemma", "2b", "gemma_2b"),
    ("google/gemma-2b-it", "gemma-2b-it", "gemma", "2b_it", "gemma_2b_it"),
    ("google/gemma-7b", "gemma-7b", "gemma", "7b", "gemma_7b"),
    ("google/gemma-7b-it", "gemma-7b-it", "gemma", "7b_it", "gemma_7b_it"),
    ("google/gemma-2-2b", "gemma-2-2b", "gemma2", "2b", "gemma2_2b"),
    ("google/gemma-2-2b-it", "gemma-2-2b-it", "gemma2", "2b_it", "gemma2_2b_it"),
    ("google/gemma-2-9b", "gemma-2-9b", "gemma2", "9b", "gemma2_9b"),
    ("google/gemma-2-9b-it", "gemma-2-9b-it", "gemma2", "9b_it", "gemma2_9b_it"),
    ("google/gemma-2-27b-it", "gemma-2-27b-it", "gemma2", "27b_it", "gemma2_27b_it"),
    ("google/gemma-3-270m", "gemma-3-270m", "gemma3", "270m", "gemma3_270m"),
    ("google/gemma-3-1b-it", "gemma-3-1b-it", "gemma3", "1b_it", "gemma3_1b_it"),
    ("google/gemma-3-4b-pt", "gemma-3-4b-pt", "gemma3", "4b_pt", "gemma3_4b_pt"),
    ("google/gemma-3-12b-it", "gemma-3-12b-it", "gemma3", "12b_it", "gemma3_12b_it"),
    ("google/gemma-3-27b-it", "gemma-3-27b-it", "gemma3", "27b_it", "gemma3_27b_it"),
    ("meta-llama/Meta-Llama-3-8B", "llama-3-8b", "llama3", "8b", "llama3_8b"),
    (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "llama-3-8b-instruct",
        "llama3",
        "8b_instruct",
        "llama3_8b_instruct",
    ),
    (
        "meta-llama/Meta-Llama-3-70B-Instruct",
        "llama-3-70b-instruct",
        "llama3",
        "70b_instruct",
        "llama3_70b_instruct",
    ),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b", "llama3p1", "8b", "llama3p1_8b"),
    (
        "meta-llama/Llama-3.1-8B-Instruct",
        "llama-3.1-8b-instruct",
        "llama3p1",
        "8b_instruct",
        "llama3p1_8b_instruct",
    ),
    ("meta-llama/Llama-3.1-70B", "llama-3.1-70b", "llama3p1", "70b", "llama3p1_70b"),
    (
        "meta-llama/Llama-3.1-405B-Instruct",
        "llama-3.1-405b-instruct",
        "llama3p1",
        "405b_instruct",
        "llama3p1_405b_instruct",
    ),
    ("meta-llama/Llama-3.2-1B", "llama-3.2-1b", "llama3p2", "1b", "llama3p2_1b"),
    (
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama-3.2-1b-instruct",
        "llama3p2",
        "1b_instruct",
        "llama3p2_1b_instruct",
    ),
    (
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama-3.2-3b-instruct",
        "llama3p2",
        "3b_instruct",
        "llama3p2_3b_instruct",
    ),
    ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b", "qwen2p5", "0p5b", "qwen2p5_0p5b"),
    (
        "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen2.5-0.5b-instruct",
        "qwen2p5",
        "0p5b_instruct",
        "qwen2p5_0p5b_instruct",
    ),
    ("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b", "qwen2p5", "1p5b", "qwen2p5_1p5b"),
    (
        "Qwen/Qwen2.5-7B-Instruct",
        "qwen2.5-7b-instruct",
        "qwen2p5",
        "7b_instruct",
        "qwen2p5_7b_instruct",
    ),
    ("Qwen/Qwen2.5-72B", "qwen2.5-72b", "qwen2p5", "72b", "qwen2p5_72b"),
    ("Qwen/Qwen3-0.6B", "qwen3-0.6b", "qwen3", "0p6b", "qwen3_0p6b"),
    ("Qwen/Qwen3-0.6B-Base", "qwen3-0.6b-base", "qwen3", "0p6b_base", "qwen3_0p6b_base"),
    ("Qwen/Qwen3-1.7B", "qwen3-1.7b", "qwen3", "1p7b", "qwen3_1p7b"),
    ("Qwen/Qwen3-8B", "qwen3-8b", "qwen3", "8b", "qwen3_8b"),
    (
        "Qwen/Qwen3-4B-Instruct-2507",
        "qwen3-4b-instruct-2507",
        "qwen3",
        "4b_instruct_2507",
        "qwen3_4b_instruct_2507",
    ),
    ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b", "qwen3", "30b_a3b", "qwen3_30b_a3b"),
    (
        "Qwen/Qwen3-235B-A22B-Thinking-2507",
        "qwen3-235b-a22b-thinking-2507",
        "qwen3",
        "235b_a22b_thinking_2507",
        "qwen3_235b_a22b_thinking_2507",
    ),
]
HF_ID_PARAMS = pytest.mark.parametrize(
    "model_id, name, family, version, config_id", HF_IDS, ids=[row[0] for row in HF_IDS]
)


def derived_fields(naming: ModelNaming) -> tuple[str, str, str, str]:
  return (
      naming.model_family,
      naming.model_version,
      naming.model_config_category,
      naming.model_config_id,
  )


@pytest.fixture
def register_families():
  """Registers families through the public decorator and removes them afterwards."""
  replaced = {}

  def register(category: str, names: tuple[str, ...]) -> None:
    replaced.setdefault(category, registry.families().get(category))
    model_class = type(f"Dummy{category.title()}ForCausalLM", (), {})
    registry.register_family(
        names=names,
        category=category,
        model_types=(category,),
        architectures=(model_class.__name__,),
        config_class=object,
        param_table=(),
    )(model_class)

  yield register
  for category, previous in replaced.items():
    if previous is None:
      del registry._families[category]
    else:
      registry._families[category] = previous


def test_builtin_families_are_registered():
  names = registry.family_names()
  assert {family: names.get(family) for family in CATEGORY_OF_FAMILY} == CATEGORY_OF_FAMILY


@HF_ID_PARAMS
def test_hf_id_derives_every_field(model_id, name, family, version, config_id):
  naming = ModelNaming(model_id=model_id)
  assert naming.model_id == model_id
  assert naming.model_name == name
  assert derived_fields(naming) == (family, version, CATEGORY_OF_FAMILY[family], config_id)


@HF_ID_PARAMS
def test_model_name_and_config_id_derive_what_the_hf_id_does(
    model_id, name, family, version, config_id
):
  from_id = derived_fields(ModelNaming(model_id=model_id))
  from_name = ModelNaming(model_name=name)
  from_config_id = ModelNaming(model_id=config_id)
  assert derived_fields(from_name) == derived_fields(from_config_id) == from_id
  assert from_name.model_id is None
  assert from_name.model_name == name
  assert from_config_id.model_name == config_id


def test_every_field_given_consistently_is_accepted():
  naming = ModelNaming(
      model_id="google/gemma-2-2b-it",
      model_name="gemma-2-2b-it",
      model_family="gemma2",
      model_version="2b_it",
      model_config_category="gemma2",
      model_config_id="gemma2_2b_it",
  )
  assert naming == ModelNaming(model_id="google/gemma-2-2b-it")


@pytest.mark.parametrize(
    "model_id, model_name, expected_name",
    [
        ("Qwen/Qwen3-0.6B", "Qwen3-0.6B", "qwen3-0.6b"),
        ("meta-llama/Meta-Llama-3-8B", "Meta-Llama-3-8B", "llama-3-8b"),
        # A config id carries no HF spelling, so an explicit name supplies it.
        ("qwen3_0p6b", "qwen3-0.6b", "qwen3-0.6b"),
        ("Qwen/Qwen3-0.6B", "qwen3_0p6b", "qwen3_0p6b"),
    ],
)
def test_id_and_name_naming_the_same_model_agree(model_id, model_name, expected_name):
  naming = ModelNaming(model_id=model_id, model_name=model_name)
  assert naming.model_name == expected_name
  assert derived_fields(naming) == derived_fields(ModelNaming(model_id=model_id))


def test_fine_tune_ids_parse_to_their_base_family():
  naming = ModelNaming(model_id="acme/Qwen3-0.6B-math")
  assert derived_fields(naming) == ("qwen3", "0p6b_math", "qwen3", "qwen3_0p6b_math")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(model_id="Qwen/Qwen3-0.6B", model_name="qwen3-4b"),
            "model_name 'qwen3-4b' disagrees with model_id 'Qwen/Qwen3-0.6B'",
        ),
        (
            dict(model_id="google/gemma-2-2b-it", model_name="gemma-2-2b"),
            "model_name 'gemma-2-2b' disagrees",
        ),
        (
            dict(model_id="Qwen/Qwen3-0.6B", model_name="mistral-7b"),
            "model_name 'mistral-7b' disagrees",
        ),
        (
            dict(model_id="google/gemma-2-2b-it", model_family="gemma"),
            "model_family='gemma' disagrees with model_id 'google/gemma-2-2b-it', "
            "which gives 'gemma2'",
        ),
        (
            dict(model_name="qwen2.5-0.5b", model_version="0.5b"),
            "model_version='0.5b' disagrees with model_name 'qwen2.5-0.5b', which gives '0p5b'",
        ),
        (
            dict(model_id="meta-llama/Llama-3.1-8B", model_config_category="llama3p1"),
            "model_config_category='llama3p1' disagrees",
        ),
        (
            dict(model_id="qwen3_8b", model_config_id="qwen3_8b_base"),
            "model_config_id='qwen3_8b_base' disagrees",
        ),
    ],
)
def test_inconsistent_fields_raise(kwargs, message):
  with pytest.raises(ModelNameError, match="^" + message.replace("(", r"\(")):
    ModelNaming(**kwargs)


@pytest.mark.parametrize(
    "model_id, message",
    [
        ("", "model_id is empty"),
        ("   ", "contains whitespace"),
        ("Qwen/Qwen3-0.6B ", "contains whitespace"),
        ("Qwen/Qwen3 0.6B", "contains whitespace"),
        ("Qwen/Qwen3-0.6B/", "starts or ends with '/'"),
        ("/Qwen3-0.6B", "starts or ends with '/'"),
        ("Qwen/../Qwen3-0.6B", "more than one '/'"),
        ("Qwen/Qwen3..0.6B", "contains '..'"),
        ("..", "contains '..'"),
        ("Qwen/Qwen3--0.6B", "contains '..' or '--'"),
        ("Qwen/Qwen3/0.6B", "more than one '/'"),
        ("Qwen//Qwen3-0.6B", "more than one '/'"),
        ("Qwen/-Qwen3-0.6B", "must start and end with a letter or digit"),
        ("Qwen/Qwen3-0.6B.", "must start and end with a letter or digit"),
        ("Qwen/Qwen3@0.6B", "may hold only letters, digits"),
        (42, "must be a string"),
    ],
)
def test_malformed_model_id_raises(model_id, message):
  with pytest.raises(ModelNameError, match=message):
    ModelNaming(model_id=model_id)


@pytest.mark.parametrize(
    "model_name, message",
    [
        ("Qwen/Qwen3-0.6B", "Pass the HF id as model_id"),
        ("", "has an empty part"),
        ("qwen3-0.6b\n", "contains whitespace"),
        (None, "needs a model_id"),
    ],
)
def test_malformed_model_name_raises(model_name, message):
  with pytest.raises(ModelNameError, match=message):
    ModelNaming(model_name=model_name)


@pytest.mark.parametrize("model_id", ["google/gemma", "qwen3", "meta-llama/Llama-3.1"])
def test_family_without_version_raises(model_id):
  with pytest.raises(ModelNameError, match="but no version"):
    ModelNaming(model_id=model_id)


@pytest.mark.parametrize(
    "model_id, suggestion",
    [
        ("Qwen/Qwen4-7B", "qwen3"),
        ("meta-llama/Lama-3.1-8B", "llama3p1"),
        ("google/gema-2-2b-it", "gemma2"),
        ("Qwen/Qwen2.6-7B", "qwen2p5"),
    ],
)
def test_unknown_family_suggests_the_closest(model_id, suggestion):
  with pytest.raises(UnknownModelError) as raised:
    ModelNaming(model_id=model_id)
  message = str(raised.value)
  assert message.startswith(f"model_id {model_id!r} starts with no registered model family.")
  assert f"Did you mean {suggestion!r}?" in message
  known = message.split("Known families: ")[1].split(".")[0].split(", ")
  assert set(CATEGORY_OF_FAMILY) <= set(known)
  assert isinstance(raised.value, ZooError)


def test_unknown_family_with_nothing_close_suggests_nothing():
  with pytest.raises(UnknownModelError, match="register_family") as raised:
    ModelNaming(model_id="acme/sft-run-42")
  assert "Did you mean" not in str(raised.value)


def test_naming_is_frozen():
  naming = ModelNaming(model_id="Qwen/Qwen3-0.6B")
  with pytest.raises(dataclasses.FrozenInstanceError):
    naming.model_family = "qwen2p5"


def test_third_party_family_is_recognised(register_families):
  with pytest.raises(UnknownModelError):
    ModelNaming(model_id="mistralai/Mistral-7B-v0.1")
  register_families("mistral", ("mistral",))
  naming = ModelNaming(model_id="mistralai/Mistral-7B-v0.1")
  assert naming.model_name == "mistral-7b-v0.1"
  assert derived_fields(naming) == ("mistral", "7b_v0p1", "mistral", "mistral_7b_v0p1")
  assert derived_fields(ModelNaming(model_id="mistral_7b_v0p1")) == derived_fields(naming)


def test_third_party_family_with_underscores_matches_hyphenated_names(register_families):
  register_families("deepseek", ("deepseek_r1_distill_qwen",))
  naming = ModelNaming(model_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
  assert derived_fields(naming) == (
      "deepseek_r1_distill_qwen",
      "1p5b",
      "deepseek",
      "deepseek_r1_distill_qwen_1p5b",
  )
  assert derived_fields(ModelNaming(model_id=naming.model_config_id)) == derived_fields(naming)


VERSION_TOKEN = st.from_regex(r"[a-z0-9]{1,3}(\.[a-z0-9]{1,2})?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    family=st.sampled_from(sorted(CATEGORY_OF_FAMILY)),
    tokens=st.lists(VERSION_TOKEN, min_size=1, max_size=4),
)
def test_config_id_round_trips(family, tokens):
  name = "-".join([family, *tokens])
  # "gemma-2" or "llama3-p1" is a family with no version left.
  assume(name.replace("-", "").replace(".", "p") not in CATEGORY_OF_FAMILY)
  naming = ModelNaming(model_name=name)
  config_id = naming.model_config_id
  assert "-" not in config_id and "." not in config_id
  assert derived_fields(ModelNaming(model_id=config_id)) == derived_fields(naming)
