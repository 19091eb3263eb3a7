//! The PC's CMOS real-time clock (a Motorola MC146818 and its CMOS RAM) at
//! ports 0x70 (index) and 0x71 (data), as Linux's `rtc_cmos` and `hwclock`
//! use it.
//!
//! No rust-vmm or crates.io crate provides one (vm-superio has only the
//! Arm PL031), so this is Keel's own model, kept small:
//!
//! - The time is the host's UTC time, from an injectable clock, plus an
//!   offset the guest sets by writing the time registers (`hwclock -w`),
//!   which lasts until Keel exits. Register B selects BCD or binary
//!   (bit 2, DM) and 12- or 24-hour (bit 1) formats; bit 7 (SET) freezes
//!   the time registers while the guest writes them, and clearing it
//!   starts the clock from what was written.
//! - Register A's update-in-progress bit (bit 7) reads as set during the
//!   last 244 µs of each host second, as on the chip (the registers are
//!   about to change), so a guest that waits for it to clear reads a
//!   consistent time right after.
//! - Register C (interrupt flags) reads 0: there is no alarm, periodic or
//!   update interrupt. Register D says the RAM and time are valid.
//! - Bit 7 of the index port is the NMI mask; it is accepted and ignored.
//! - Every other byte (0x0E to 0x7F) is plain CMOS RAM; the memory-size
//!   bytes BIOSes and some guests read are filled in from the VM's memory
//!   size. Register 0x32 is the century (the FADT points at it).

use std::time::{Duration, SystemTime};

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::bus::{read_byte_register, BusDevice};

/// First port of the RTC (index); the data port follows.
pub const RTC_PORT: u64 = 0x70;
/// Ports the RTC occupies.
pub const RTC_PORT_LEN: u64 = 2;
/// The RTC's ISA interrupt line (described to the guest; never raised).
pub const RTC_IRQ: u32 = 8;
/// The CMOS register holding the century (for the FADT's `century`).
pub const RTC_CENTURY_REG: u8 = 0x32;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = RTC_CENTURY_REG as usize;

/// Register A: update in progress.
const A_UIP: u8 = 1 << 7;
/// Register A after power-on: 32.768 kHz time base, 1024 Hz rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates halted while the guest sets the time.
const B_SET: u8 = 1 << 7;
/// Register B: binary (not BCD) data mode.
const B_DM_BINARY: u8 = 1 << 2;
/// Register B: 24-hour mode.
const B_24H: u8 = 1 << 1;
/// Register B after power-on: BCD, 24-hour.
const B_DEFAULT: u8 = B_24H;
/// Register D: valid RAM and time.
const D_VRT: u8 = 1 << 7;
/// The hours register's PM flag in 12-hour mode.
const HOUR_PM: u8 = 1 << 7;
/// How long before each second the update-in-progress bit is set.
const UIP_WINDOW: Duration = Duration::from_micros(244);

/// Where the RTC reads the host's time: time since the Unix epoch.
pub type Clock = Box<dyn Fn() -> Duration + Send>;

/// The host's real-time clock.
fn host_clock() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The CMOS RTC and its 128 bytes of RAM.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
    /// Seconds the guest's clock is ahead of the host's.
    offset: i64,
}

impl Cmos {
    /// An RTC on the host's clock, its RAM telling a VM with `below_4g`
    /// bytes of RAM below 4 GiB and `above_4g` above.
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        Self::with_clock(below_4g, above_4g, Box::new(host_clock))
    }

    /// The same on `clock` (tests pass a fixed one).
    pub fn with_clock(below_4g: u64, above_4g: u64, clock: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = A_DEFAULT;
        ram[REG_B] = B_DEFAULT;
        ram[REG_D] = D_VRT;
        // Base memory in KiB (640), extended memory above 1 MiB in KiB
        // (at most 0xffff), memory above 16 MiB in 64 KiB units (at most
        // 0xffff), memory above 4 GiB in 64 KiB units (24 bits).
        let put16 = |ram: &mut [u8; 128], at: usize, v: u64| {
            let v = v.min(0xffff) as u16;
            ram[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        put16(&mut ram, 0x15, 640);
        let ext_kib = below_4g.saturating_sub(1 << 20) >> 10;
        put16(&mut ram, 0x17, ext_kib);
        put16(&mut ram, 0x30, ext_kib);
        put16(&mut ram, 0x34, below_4g.saturating_sub(16 << 20) >> 16);
        let high = (above_4g >> 16).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        Cmos {
            index: 0,
            ram,
            clock,
            offset: 0,
        }
    }

    fn binary(&self) -> bool {
        self.ram[REG_B] & B_DM_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    }

    /// The guest's current time, whole seconds since the epoch, and the
    /// fraction of the host's second that has passed.
    fn now(&self) -> (i64, Duration) {
        let host = (self.clock)();
        let secs = i64::try_from(host.as_secs()).unwrap_or(i64::MAX);
        (
            secs.saturating_add(self.offset),
            Duration::from_nanos(u64::from(host.subsec_nanos())),
        )
    }

    /// Writes the time `t` into the time registers in the current format.
    fn store_time(&mut self, t: i64) {
        let dt = OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let hour = dt.hour();
        let hours = if self.ram[REG_B] & B_24H != 0 {
            self.encode(hour)
        } else {
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
        };
        let year = dt.year().rem_euclid(10_000);
        self.ram[SECONDS] = self.encode(dt.second());
        self.ram[MINUTES] = self.encode(dt.minute());
        self.ram[HOURS] = hours;
        self.ram[WEEKDAY] = self.encode(dt.weekday().number_from_sunday());
        self.ram[DAY] = self.encode(dt.day());
        self.ram[MONTH] = self.encode(u8::from(dt.month()));
        self.ram[YEAR] = self.encode((year % 100) as u8);
        self.ram[CENTURY] = self.encode((year / 100) as u8);
    }

    /// The time the time registers hold, if they hold a valid one.
    fn load_time(&self) -> Option<i64> {
        let raw_hours = self.ram[HOURS];
        let hour = if self.ram[REG_B] & B_24H != 0 {
            self.decode(raw_hours)
        } else {
            let h12 = self.decode(raw_hours & !HOUR_PM) % 12;
            h12 + if raw_hours & HOUR_PM != 0 { 12 } else { 0 }
        };
        let year = i32::from(self.decode(self.ram[CENTURY])) * 100
            + i32::from(self.decode(self.ram[YEAR]));
        let month = Month::try_from(self.decode(self.ram[MONTH])).ok()?;
        let date = Date::from_calendar_date(year, month, self.decode(self.ram[DAY])).ok()?;
        let time = Time::from_hms(
            hour,
            self.decode(self.ram[MINUTES]),
            self.decode(self.ram[SECONDS]),
        )
        .ok()?;
        Some(
            PrimitiveDateTime::new(date, time)
                .assume_utc()
                .unix_timestamp(),
        )
    }

    /// Starts the clock from the time registers (after the guest wrote
    /// them); an invalid time leaves the clock as it was.
    fn adopt_written_time(&mut self) {
        match self.load_time() {
            Some(t) => {
                let host = i64::try_from((self.clock)().as_secs()).unwrap_or(i64::MAX);
                self.offset = t.saturating_sub(host);
            }
            None => log::debug!("rtc: the guest wrote an invalid time; ignored"),
        }
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        let updating = self.ram[REG_B] & B_SET == 0;
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY if updating => {
                let (t, _) = self.now();
                self.store_time(t);
                self.ram[reg]
            }
            REG_A => {
                let (_, frac) = self.now();
                let uip = updating && frac >= Duration::from_secs(1) - UIP_WINDOW;
                self.ram[REG_A] | if uip { A_UIP } else { 0 }
            }
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.ram[reg],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8) {
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                if self.ram[REG_B] & B_SET != 0 {
                    self.ram[reg] = v;
                } else {
                    // A single register written while the clock runs.
                    let (t, _) = self.now();
                    self.store_time(t);
                    self.ram[reg] = v;
                    self.adopt_written_time();
                }
            }
            REG_A => self.ram[REG_A] = v & !A_UIP,
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                if !was_set && v & B_SET != 0 {
                    // Freeze the registers at the current time, in the
                    // format in force now.
                    let (t, _) = self.now();
                    self.store_time(t);
                }
                self.ram[REG_B] = v;
                if was_set && v & B_SET == 0 {
                    self.adopt_written_time();
                }
            }
            REG_C | REG_D => {}
            _ => self.ram[reg] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            1 => self.read_reg(usize::from(self.index)),
            _ => 0xff,
        };
        read_byte_register(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 masks NMIs on a PC; Keel has no NMI source to mask.
            0 => self.index = v & 0x7f,
            1 => self.write_reg(usize::from(self.index), v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// 2026-11-30 21:45:07 UTC, a Monday.
    const T0: u64 = 1_796_075_107;

    /// An RTC on a clock the test moves (nanoseconds since the epoch).
    fn rtc_at(nanos: u64) -> (Cmos, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(nanos));
        let c = now.clone();
        let clock: Clock = Box::new(move || Duration::from_nanos(c.load(Ordering::SeqCst)));
        (Cmos::with_clock(3 << 30, 5 << 30, clock), now)
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    fn write(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0, &[reg]);
        c.write(1, &[v]);
    }

    fn time_regs(c: &mut Cmos) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| read(c, r))
    }

    #[test]
    fn reads_the_clock_in_bcd_24h_by_default() {
        let (mut c, _) = rtc_at(T0 * 1_000_000_000);
        assert_eq!(read(&mut c, 0x0b), 0x02);
        // sec, min, hour, weekday (Monday = 2), day, month, year, century.
        assert_eq!(
            time_regs(&mut c),
            [0x07, 0x45, 0x21, 0x02, 0x30, 0x11, 0x26, 0x20]
        );
        assert_eq!(read(&mut c, 0x0d), 0x80, "valid RAM and time");
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let (mut c, _) = rtc_at(T0 * 1_000_000_000);
        write(&mut c, 0x0b, B_DM_BINARY | B_24H);
        assert_eq!(time_regs(&mut c), [7, 45, 21, 2, 30, 11, 26, 20]);
        // 12-hour binary: 21 h is 9 PM.
        write(&mut c, 0x0b, B_DM_BINARY);
        assert_eq!(read(&mut c, 0x04), 9 | HOUR_PM);
        // 12-hour BCD.
        write(&mut c, 0x0b, 0);
        assert_eq!(read(&mut c, 0x04), 0x09 | HOUR_PM);
    }

    #[test]
    fn midnight_and_noon_in_12_hour_mode() {
        let midnight = T0 - (21 * 3600 + 45 * 60 + 7);
        let (mut c, now) = rtc_at(midnight * 1_000_000_000);
        write(&mut c, 0x0b, 0);
        assert_eq!(read(&mut c, 0x04), 0x12, "12 AM");
        now.store((midnight + 12 * 3600) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(read(&mut c, 0x04), 0x12 | HOUR_PM, "12 PM");
    }

    #[test]
    fn the_clock_runs() {
        let (mut c, now) = rtc_at(T0 * 1_000_000_000);
        now.store((T0 + 60) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(read(&mut c, 0x00), 0x07);
        assert_eq!(read(&mut c, 0x02), 0x46);
    }

    #[test]
    fn update_in_progress_only_just_before_a_second() {
        let (mut c, now) = rtc_at(T0 * 1_000_000_000 + 500_000_000);
        assert_eq!(read(&mut c, 0x0a), A_DEFAULT, "mid-second: no UIP");
        now.store(T0 * 1_000_000_000 + 999_900_000, Ordering::SeqCst);
        assert_eq!(read(&mut c, 0x0a), A_DEFAULT | A_UIP);
        // The guest cannot set it.
        now.store(T0 * 1_000_000_000, Ordering::SeqCst);
        write(&mut c, 0x0a, 0xa6);
        assert_eq!(read(&mut c, 0x0a), A_DEFAULT);
    }

    #[test]
    fn guest_sets_the_time_with_the_set_bit() {
        let (mut c, now) = rtc_at(T0 * 1_000_000_000);
        // hwclock -w: SET, write 2030-01-02 03:04:05 in BCD, clear SET.
        write(&mut c, 0x0b, B_SET | B_24H);
        assert_eq!(read(&mut c, 0x0a) & A_UIP, 0);
        for (reg, v) in [
            (0x00, 0x05),
            (0x02, 0x04),
            (0x04, 0x03),
            (0x07, 0x02),
            (0x08, 0x01),
            (0x09, 0x30),
            (0x32, 0x20),
        ] {
            write(&mut c, reg, v);
        }
        // Frozen while SET: the host clock moves, the registers do not.
        now.store((T0 + 10) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(read(&mut c, 0x00), 0x05);
        write(&mut c, 0x0b, B_24H);
        // 2030-01-02 was a Wednesday (4); ten seconds later it still runs.
        now.store((T0 + 20) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(
            time_regs(&mut c),
            [0x15, 0x04, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20]
        );
    }

    #[test]
    fn a_single_register_written_while_running_moves_the_clock() {
        let (mut c, _) = rtc_at(T0 * 1_000_000_000);
        write(&mut c, 0x04, 0x05);
        assert_eq!(time_regs(&mut c)[..3], [0x07, 0x45, 0x05]);
        // An invalid month leaves the clock as it was.
        write(&mut c, 0x08, 0x13);
        assert_eq!(read(&mut c, 0x08), 0x11);
    }

    #[test]
    fn nmi_mask_bit_is_stripped_and_ram_is_plain() {
        let (mut c, _) = rtc_at(T0 * 1_000_000_000);
        c.write(0, &[0x80 | 0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        let mut idx = [0u8];
        c.read(0, &mut idx);
        assert_eq!(idx[0], 0x40);
        write(&mut c, 0x7f, 0xa5);
        assert_eq!(read(&mut c, 0x7f), 0xa5);
        // Register C reads 0 (no interrupts), D cannot be changed.
        assert_eq!(read(&mut c, 0x0c), 0);
        write(&mut c, 0x0d, 0);
        assert_eq!(read(&mut c, 0x0d), 0x80);
    }

    #[test]
    fn memory_size_bytes() {
        let (mut c, _) = rtc_at(0);
        let word = |c: &mut Cmos, r: u8| u16::from_le_bytes([read(c, r), read(c, r + 1)]);
        assert_eq!(word(&mut c, 0x15), 640);
        assert_eq!(word(&mut c, 0x17), 0xffff, "3 GiB - 1 MiB in KiB, capped");
        assert_eq!(word(&mut c, 0x30), 0xffff);
        assert_eq!(word(&mut c, 0x34), 0xbf00, "3 GiB - 16 MiB in 64 KiB units");
        let high = u32::from_le_bytes([
            read(&mut c, 0x5b),
            read(&mut c, 0x5c),
            read(&mut c, 0x5d),
            0,
        ]);
        assert_eq!(high, 5 << 14, "5 GiB in 64 KiB units");
    }
}
