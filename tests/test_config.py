import pytest

from sgsd.config import Config, config_from_dict, dump_config, load_config, parse_override
from sgsd.errors import ConfigError


def test_defaults_are_the_papers_sgsd_settings():
    cfg = load_config()
    assert cfg.objective.tau == 1.0
    assert cfg.objective.clip == 3.0
    assert cfg.objective.threshold == 0.05
    assert cfg.teachers.count == 8
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.1, 0.95, 20)
    assert cfg.rollout.max_new_tokens == 1024
    assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (64, 128)
    assert cfg.train.lr == 5e-6
    assert (cfg.skills.update_every, cfg.skills.success_threshold) == (25, 0.8)
    assert (cfg.skills.max_new, cfg.skills.capacity) == (5, 30)
    assert cfg.teachers.mode == "live"
    assert cfg.objective.support_estimator == "paper"
    assert (cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (12, 1.0, 0.95, 0)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("objective:\n  tau: 2\n  clip: null\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["objective.tau=0.5", "model.lora_target_modules=[q_proj, v_proj]"])
    assert cfg.objective.tau == 0.5  # override wins over the file
    assert isinstance(cfg.objective.tau, float)
    assert cfg.objective.clip is None
    assert cfg.train.steps == 7
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config_from_dict({"objective": {"tau": 2}}).objective.tau == 2.0
    with pytest.raises(ConfigError, match=r"train.steps: expected int"):
        config_from_dict({"train": {"steps": 2.5}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"objectiv": {}}, r"unknown section 'objectiv'; did you mean 'objective'"),
        ({"objective": {"tua": 1}}, r"unknown key 'objective.tua'; did you mean 'tau'"),
        ({"objective": {"tau": 0}}, r"objective.tau must be > 0, got 0.0"),
        ({"objective": {"tau": -1}}, r"objective.tau must be > 0"),
        ({"objective": {"tau": "big"}}, r"objective.tau: expected float"),
        ({"objective": {"threshold": -0.1}}, r"objective.threshold must be >= 0"),
        ({"train": {"method": "ppo"}}, r"train.method: expected 'sgsd' \| 'opsd'"),
        ({"train": {"batch_size": 6, "micro_batch_size": 4}}, r"multiple of train.micro_batch_size"),
        ({"rollout": {"top_p": 1.5}}, r"rollout.top_p must be in \(0, 1\]"),
        ({"train": {"method": "grpo"}, "rollout": {"num_generations": 1}}, r"num_generations must be >= 2"),
        ({"teachers": {"enable_thinking": "yes"}}, r"teachers.enable_thinking: expected bool"),
        ({"objective": 3}, r"section 'objective' must be a mapping"),
        (
            {"objective": {"support_estimator": "median"}},
            r"support_estimator: expected 'paper' \| 'expected'",
        ),
        (
            {"objective": {"support_estimator": "teacher_centred"}, "teachers": {"count": 1}},
            r"teacher_centred needs teachers.count >= 2",
        ),
        (
            {"objective": {"support_estimator": "expected", "support": "topk"}},
            r"expected needs objective.support=full",
        ),
        ({"probe": {"rollouts": 0}}, r"probe.rollouts must be >= 1"),
    ],
)
def test_invalid_values_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  tau: [1, \n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


@pytest.mark.parametrize("text", ["objective.tau", "tau=1", "a.b.c=1", ".tau=1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["objective.tau=0.25", "objective.clip=null", "train.method=opsd"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    again = load_config(f)
    assert again == cfg
    assert again != Config()


def test_base_file_is_applied_first(tmp_path):
    (tmp_path / "base.yaml").write_text("objective:\n  tau: 2\ntrain:\n  steps: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.objective.tau, cfg.train.steps) == (2.0, 9)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_every_packaged_config_is_valid():
    from sgsd.configs import available_configs, resolve_config_path

    names = available_configs()
    assert "demo" in names and "paper/qwen3-1.7b/sgsd" in names and "paper/ablations/no_polarity" in names
    for name in names:
        load_config(resolve_config_path(name))
    assert load_config(resolve_config_path("paper/ablations/no_robust")).objective.clip is None
    assert load_config(resolve_config_path("paper/qwen3-4b/grpo")).rollout.num_generations == 8


def test_unknown_packaged_config_names_the_options():
    from sgsd.configs import resolve_config_path

    with pytest.raises(ConfigError, match="unknown config 'dmeo'; packaged configs: .*demo"):
        resolve_config_path("dmeo")


def test_validation_only_in_loop_evaluation_needs_a_validation_split():
    with pytest.raises(ConfigError, match="eval.test_in_loop=false needs data.validation_size"):
        load_config(None, ["eval.test_in_loop=false"])
    cfg = load_config(None, ["eval.test_in_loop=false", "data.validation_size=8", "train.cpu_budget_s=60"])
    assert cfg.data.validation_size == 8 and cfg.train.cpu_budget_s == 60.0
    with pytest.raises(ConfigError, match="train.cpu_budget_s must be >= 0"):
        load_config(None, ["train.cpu_budget_s=-1"])
