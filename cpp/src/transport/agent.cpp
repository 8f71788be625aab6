#include "lifecycle/transport/agent.hpp"

#include "lifecycle/error_base.hpp"

namespace lifecycle::transport {

namespace {
constexpr std::array<std::uint8_t, 4> kMagic = {'K', 'V', 'L', 'C'};
constexpr std::uint8_t kWireVersion = 2;
}  // namespace

void check_c_name(const std::string& name, const char* what, const std::string& context) {
  if (name.find('\0') == std::string::npos) return;
  std::string shown;
  for (char c : name) shown += c == '\0' ? std::string("\\0") : std::string(1, c);
  throw InvalidArgumentError(what, (context.empty() ? "" : context + ": ") + "'" + shown +
                                       "' holds a NUL character (NIXL takes names as C strings and would cut it there)");
}

const char* to_string(XferState s) noexcept {
  switch (s) {
    case XferState::InProgress:
      return "InProgress";
    case XferState::Done:
      return "Done";
    case XferState::Failed:
      return "Failed";
    case XferState::Unknown:
      return "Unknown";
  }
  return "?";
}

const char* to_string(NotifKind k) noexcept {
  switch (k) {
    case NotifKind::Done:
      return "done";
    case NotifKind::Stop:
      return "stop";
    case NotifKind::Quiesced:
      return "quiesced";
  }
  return "?";
}

std::array<std::uint8_t, kNotifWireSize> encode_notif(const NotifMessage& m) noexcept {
  std::array<std::uint8_t, kNotifWireSize> out{};
  for (std::size_t i = 0; i < kMagic.size(); ++i) out[i] = kMagic[i];
  out[4] = kWireVersion;
  out[5] = static_cast<std::uint8_t>(m.kind);
  for (std::size_t i = 0; i < 8; ++i) {
    out[8 + i] = static_cast<std::uint8_t>(m.req >> (8 * i));
    out[16 + i] = static_cast<std::uint8_t>(m.tag >> (8 * i));
  }
  return out;
}

std::optional<NotifMessage> decode_notif(const std::string& bytes) noexcept {
  if (bytes.size() != kNotifWireSize) return std::nullopt;
  const auto* b = reinterpret_cast<const std::uint8_t*>(bytes.data());
  for (std::size_t i = 0; i < kMagic.size(); ++i) {
    if (b[i] != kMagic[i]) return std::nullopt;
  }
  if (b[4] != kWireVersion || b[6] != 0 || b[7] != 0) return std::nullopt;
  NotifMessage m;
  switch (b[5]) {
    case static_cast<std::uint8_t>(NotifKind::Done):
      m.kind = NotifKind::Done;
      break;
    case static_cast<std::uint8_t>(NotifKind::Stop):
      m.kind = NotifKind::Stop;
      break;
    case static_cast<std::uint8_t>(NotifKind::Quiesced):
      m.kind = NotifKind::Quiesced;
      break;
    default:
      return std::nullopt;
  }
  for (std::size_t i = 0; i < 8; ++i) {
    m.req |= static_cast<std::uint64_t>(b[8 + i]) << (8 * i);
    m.tag |= static_cast<std::uint64_t>(b[16 + i]) << (8 * i);
  }
  return m;
}

std::string encode_notif_string(const NotifMessage& m) {
  const auto msg = encode_notif(m);
  return std::string(reinterpret_cast<const char*>(msg.data()), msg.size());
}

}  // namespace lifecycle::transport
